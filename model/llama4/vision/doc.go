// Package vision is Llama 4's vision path: the vision tower (Llama4VisionModel: patch embedding, class and
// positional embeddings, 2-D RoPE encoder layers without a causal mask, pixel shuffle and the vision
// adapter) and the multi_modal_projector (shared/reference/llama4-spec.md §6.2, §6.4), written once over
// backend.Ops and the optional backend.EncoderOps, so the same code runs on backend/cpu (the float32
// reference, matching HF to 1e-4) and backend/cuda (bf16 weights).
//
// Config reads a Llama4ForConditionalGeneration config.json's vision_config and image token ids; a
// text-only checkpoint gives ErrNoVision. The tensors are declared once as a tagged tree (model.Tree, see
// tree.go) under their checkpoint names (vision_model.*, multi_modal_projector.*, spec §3.1) and loaded
// whole into a backend with Load (Random makes random ones of a configuration, for benchmarks). They carry
// no split tags: every rank that runs the tower holds all of it. Model.Features turns pixel values
// [tiles, 3, size, size] (package imageproc's output, or HF's) into one text-embedding row per <|patch|>
// slot, in the order the prompt holds the slots, running the tiles through the encoder together
// (MaxTilesPerPass at a time); model/llama4 places them there (Model.ForwardImages).
package vision
