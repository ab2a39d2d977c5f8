package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/tpfleet/tpfleet/model/llama4/imageproc"
	"github.com/tpfleet/tpfleet/model/llama4/vision"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// imageFiles is generate's repeatable --image flag.
type imageFiles []string

func (f *imageFiles) String() string { return strings.Join(*f, ",") }

func (f *imageFiles) Set(v string) error {
	*f = append(*f, v)
	return nil
}

// imageGenerator is a model whose generation takes image features in place of the embeddings of the
// prompt's <|patch|> (patchID) slots (llama4's runner).
type imageGenerator interface {
	GenerateImages(ctx context.Context, prompt []int, patchID int, features []float32, opt modelrun.GenerateOptions, emit func(id int) error) ([]int, modelrun.Finish, error)
}

// imagePrompt reads the image files, processes them as Llama4Processor does for the checkpoint's vision
// tower and expands the prompt's <|image|> placeholders; a prompt without any gets one per image right
// after its BOS. It returns the expanded prompt and the pixel values. The checkpoint must have a vision
// tower and a tokenizer with Llama 4's image tokens.
func imagePrompt(dir string, files []string, prompt []int, tok *tokenizer.Tokenizer) ([]int, *pixels, error) {
	vcfg, err := vision.LoadConfig(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("--image: %w", err)
	}
	if tok == nil {
		return nil, nil, fmt.Errorf("--image needs the model's tokenizer (tokenizer.json) for the image tokens")
	}
	ids, err := imageproc.LookupIDs(tok.TokenID)
	if err != nil {
		return nil, nil, fmt.Errorf("--image: %w", err)
	}
	if ids.Patch != vcfg.PatchID {
		return nil, nil, fmt.Errorf("--image: the tokenizer's <|patch|> is %d, config.json's image_token_index %d", ids.Patch, vcfg.PatchID)
	}
	pc := imageproc.Config{TileSize: vcfg.ImageSize, PatchSize: vcfg.PatchSize, PixelShuffleRatio: vcfg.PixelShuffleRatio}
	if err := pc.Validate(); err != nil {
		return nil, nil, fmt.Errorf("--image: %w", err)
	}
	if !slices.Contains(prompt, ids.Image) {
		at := 0
		if bos, ok := tok.BOS(); ok && len(prompt) > 0 && prompt[0] == bos {
			at = 1
		}
		prompt = slices.Insert(slices.Clone(prompt), at, slices.Repeat([]int{ids.Image}, len(files))...)
	}
	data := make([][]byte, len(files))
	for i, name := range files {
		if i >= imageproc.DefaultMaxImages {
			break // Prepare reports the count
		}
		st, err := os.Stat(name)
		if err != nil {
			return nil, nil, fmt.Errorf("--image: %w", err)
		}
		if st.Size() > maxImageBytes {
			return nil, nil, fmt.Errorf("--image %s: %d bytes, more than %d", name, st.Size(), maxImageBytes)
		}
		if data[i], err = os.ReadFile(name); err != nil {
			return nil, nil, fmt.Errorf("--image: %w", err)
		}
	}
	req, err := pc.Prepare(prompt, data, ids)
	if err != nil {
		return nil, nil, fmt.Errorf("--image: %w", err)
	}
	return req.IDs, &pixels{values: req.Pixels, shape: []int{req.Tiles, 3, vcfg.ImageSize, vcfg.ImageSize}}, nil
}

// maxImageBytes bounds an image file generate reads.
const maxImageBytes = 64 << 20
