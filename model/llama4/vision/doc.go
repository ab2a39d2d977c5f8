// Package vision is Llama 4's vision path on the host: the vision tower (Llama4VisionModel: patch
// embedding, class and positional embeddings, 2-D RoPE encoder layers, pixel shuffle and the vision
// adapter) and the multi_modal_projector, in float32 Go (shared/reference/llama4-spec.md §6.2, §6.4).
//
// Config reads a Llama4ForConditionalGeneration config.json's vision_config and image token ids; a
// text-only checkpoint gives ErrNoVision. The tensors are declared once as a tagged tree (model.Tree, see
// tree.go) under their checkpoint names (vision_model.*, multi_modal_projector.*, spec §3.1) and loaded
// whole with model.Load (Load). Model.Features turns pixel values [tiles, 3, size, size] (package
// imageproc's output, or HF's) into one text-embedding row per <|patch|> slot, in the order the prompt
// holds the slots; model/llama4 places them there (Model.ForwardImages).
//
// The package is the CPU reference of the vision path: it runs on the host whatever the text model's
// backend, replicated on every rank. Splitting the vision weights by their tp_plan and running them on a
// GPU backend is future work.
package vision
