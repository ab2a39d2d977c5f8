package llama4

import (
	"context"
	"errors"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4/imageproc"
	"github.com/tpfleet/tpfleet/model/llama4/vision"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
)

// The served image path (model.ImageConfig for the coordinator, run.ImageOpener and run.ImageModel for
// the workers): the coordinator expands a prompt's <|image|> placeholders with each image's tile layout
// (spec §6.3), every rank decodes and processes the same bytes (spec §6.1) and runs the vision tower on
// its backend over all of a step's tiles at once (spec §6.2, §6.4), and the text model takes the features
// in the <|patch|> slots (ForwardImages).

var (
	_ model.ImageConfig = Config{}
	_ run.ImageOpener   = Config{}
	_ run.ImageModel    = runner{}
)

// ImagePrompter reads dir's vision_config and the tokenizer's image tokens (model.ImageConfig). A
// checkpoint without a vision_config wraps model.ErrNoImages.
func (c Config) ImagePrompter(dir string, tokenID func(string) (int, bool)) (model.ImagePrompter, error) {
	vcfg, pc, err := visionConfig(dir)
	if err != nil {
		return nil, err
	}
	ids, err := imageproc.LookupIDs(tokenID)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", model.ErrNoImages, err)
	}
	if ids.Patch != vcfg.PatchID {
		return nil, fmt.Errorf("%w: %s: the tokenizer's %s is %d, config.json's image_token_index %d", model.ErrConfig, dir, imageproc.TokenPatch, ids.Patch, vcfg.PatchID)
	}
	return imagePrompter{pc: pc, ids: ids}, nil
}

// visionConfig reads dir's vision tower configuration and the matching processor configuration.
func visionConfig(dir string) (vision.Config, imageproc.Config, error) {
	vcfg, err := vision.LoadConfig(dir)
	if errors.Is(err, vision.ErrNoVision) {
		return vision.Config{}, imageproc.Config{}, fmt.Errorf("%w: its config.json has no vision_config", model.ErrNoImages)
	}
	if err != nil {
		return vision.Config{}, imageproc.Config{}, fmt.Errorf("%w: %w", model.ErrConfig, err)
	}
	pc := imageproc.Config{TileSize: vcfg.ImageSize, PatchSize: vcfg.PatchSize, PixelShuffleRatio: vcfg.PixelShuffleRatio}
	if err := pc.Validate(); err != nil {
		return vision.Config{}, imageproc.Config{}, fmt.Errorf("%w: %s: %w", model.ErrConfig, dir, err)
	}
	if pc.TokensPerTile() != vcfg.TokensPerTile() {
		return vision.Config{}, imageproc.Config{}, fmt.Errorf("%w: %s: the processor lays out %d slots a tile, the vision tower gives %d features", model.ErrConfig, dir, pc.TokensPerTile(), vcfg.TokensPerTile())
	}
	return vcfg, pc, nil
}

// imagePrompter is Llama 4's model.ImagePrompter.
type imagePrompter struct {
	pc  imageproc.Config
	ids imageproc.SpecialIDs
}

func (p imagePrompter) Placeholder() string { return imageproc.TokenImage }
func (p imagePrompter) PlaceholderID() int  { return p.ids.Image }
func (p imagePrompter) MaxImages() int      { return maxImages(p.pc) }

// maxImages is a processor configuration's bound on the images of a prompt.
func maxImages(pc imageproc.Config) int {
	if pc.MaxImages == 0 {
		return imageproc.DefaultMaxImages
	}
	return pc.MaxImages
}

// Expand checks the count first, then decodes each image (its size read from the header before its
// pixels) only to validate it and to choose its tile grid, and expands the placeholders.
func (p imagePrompter) Expand(prompt []int, images [][]byte) ([]int, error) {
	if err := p.checkCount(prompt, len(images)); err != nil {
		return nil, err
	}
	grids := make([]imageproc.Grid, len(images))
	for i, data := range images {
		img, err := p.pc.Decode(data)
		if err != nil {
			return nil, fmt.Errorf("%w: image %d: %w", model.ErrImage, i, err)
		}
		grids[i] = p.pc.BestFit(img.Height, img.Width)
	}
	out, err := p.pc.Expand(prompt, grids, p.ids)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", model.ErrImage, err)
	}
	return out, nil
}

// checkCount refuses more images than a prompt may hold, and images that do not pair up with the
// prompt's placeholders, before any is decoded.
func (p imagePrompter) checkCount(prompt []int, images int) error {
	if limit := p.MaxImages(); images > limit {
		return fmt.Errorf("%w: %d images, at most %d per prompt", model.ErrImage, images, limit)
	}
	n := 0
	for _, id := range prompt {
		if id == p.ids.Image {
			n++
		}
	}
	if n != images {
		return fmt.Errorf("%w: the prompt has %d %s placeholders for %d images", model.ErrImage, n, imageproc.TokenImage, images)
	}
	return nil
}

// OpenImageEncoder loads dir's vision tower and projector into ops (run.ImageOpener): bf16 on a GPU,
// float32 on the cpu backend.
func (c Config) OpenImageEncoder(ctx context.Context, dir string, ops backend.Ops) (run.ImageEncoder, error) {
	vcfg, pc, err := visionConfig(dir)
	if err != nil {
		return nil, err
	}
	if vcfg.TextHiddenSize != c.HiddenSize {
		return nil, fmt.Errorf("%w: %s: the projector gives rows of %d, the text model's hidden_size is %d", model.ErrConfig, dir, vcfg.TextHiddenSize, c.HiddenSize)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("vision tower: %w", err)
	}
	defer ckpt.Close()
	vm, err := vision.Load(ctx, ops, ckpt, vcfg)
	if err != nil {
		return nil, err
	}
	return &imageEncoder{vm: vm, pc: pc}, nil
}

// imageEncoder is Llama 4's run.ImageEncoder: imageproc then the vision tower.
type imageEncoder struct {
	vm *vision.Model
	pc imageproc.Config
}

func (e *imageEncoder) SlotID() int { return e.vm.Config.PatchID }
func (e *imageEncoder) Width() int  { return e.vm.Config.TextHiddenSize }

// Encode processes every prompt's images and runs the tower once over all their tiles.
func (e *imageEncoder) Encode(ctx context.Context, prompts [][][]byte) ([][]float32, error) {
	var pixels []float32
	tiles := make([]int, len(prompts))
	for p, images := range prompts {
		if limit := maxImages(e.pc); len(images) > limit {
			return nil, fmt.Errorf("%w: prompt %d: %d images, at most %d per prompt", model.ErrImage, p, len(images), limit)
		}
		for i, data := range images {
			img, err := e.pc.Decode(data)
			if err != nil {
				return nil, fmt.Errorf("%w: prompt %d: image %d: %w", model.ErrImage, p, i, err)
			}
			pr, err := e.pc.Process(img)
			if err != nil {
				return nil, fmt.Errorf("%w: prompt %d: image %d: %w", model.ErrImage, p, i, err)
			}
			pixels = append(pixels, pr.Pixels...)
			tiles[p] += pr.Tiles()
		}
	}
	out := make([][]float32, len(prompts))
	total := 0
	for _, t := range tiles {
		total += t
	}
	if total == 0 {
		return out, nil
	}
	all, err := e.vm.Features(ctx, pixels, total)
	if err != nil {
		return nil, err
	}
	per := e.vm.Config.TokensPerTile() * e.vm.Config.TextHiddenSize
	for p, t := range tiles {
		if t > 0 {
			out[p], all = all[:t*per:t*per], all[t*per:]
		}
	}
	return out, nil
}

// ForwardBatchImages is ForwardBatch with image features in the <|patch|> slots (run.ImageModel).
func (r runner) ForwardBatchImages(ctx context.Context, seqs []run.Sequence, ids [][]int, slotID int, features [][]float32, allLogits bool) (backend.Tensor, error) {
	own := make([]*Sequence, len(seqs))
	for i, s := range seqs {
		var ok bool
		if own[i], ok = s.(*Sequence); !ok {
			return nil, fmt.Errorf("%w: sequence %d is a %T, not one of this model's", ErrInput, i, s)
		}
	}
	if len(features) != len(seqs) {
		return nil, fmt.Errorf("%w: %d sequences with %d feature lists", ErrInput, len(seqs), len(features))
	}
	images := make([]Images, len(features))
	for i, f := range features {
		images[i] = Images{PatchID: slotID, Features: f}
	}
	return r.m.forwardBatch(ctx, own, ids, images, allLogits)
}
