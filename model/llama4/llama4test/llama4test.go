// Package llama4test holds what tests of several packages need of Llama 4's images: a fixture checkpoint
// made to take images, and small test images. It is imported by tests only.
package llama4test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"os"
	"path/filepath"
)

// Image token ids of testdata/tokenizer (<|image_start|>, <|image_end|>, <|image|>).
const (
	ImageStartID = 505
	ImageEndID   = 506
	ImageID      = 510
)

// VisionCheckpoint makes dir a copy of the checkpoint in src (its files linked, not copied) whose
// config.json names the image token ids, so that a fixture with a vision tower (dense-moe-mm: 28-pixel
// tiles, one <|patch|> slot a tile) takes images with testdata/tokenizer's ids.
func VisionCheckpoint(src, dir string) error {
	src, err := filepath.Abs(src)
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() != "config.json" {
			if err := os.Symlink(filepath.Join(src, e.Name()), filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	var cfg map[string]any
	data, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err == nil {
		err = json.Unmarshal(data, &cfg)
	}
	if err != nil {
		return fmt.Errorf("vision checkpoint from %s: %w", src, err)
	}
	cfg["boi_token_index"], cfg["eoi_token_index"], cfg["image_token_index"] = ImageStartID, ImageEndID, ImageID
	if data, err = json.Marshal(cfg); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644)
}

// PNG encodes a w×h image whose pixels depend on seed.
func PNG(w, h, seed int) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = uint8(i*seed + i/5)
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		panic(err) // an in-memory NRGBA always encodes
	}
	return b.Bytes()
}
