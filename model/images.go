package model

import "errors"

// ErrNoImages means a checkpoint that takes no images: its family has no vision tower, or its config.json
// declares none. Errors wrap it and name the checkpoint.
var ErrNoImages = errors.New("model: the checkpoint takes no images")

// ErrImage means a request's images that the model cannot take: bytes that are no image, an image too
// large, more images than a prompt allows, images and placeholders that do not pair up. Errors wrap it
// and name the image (from 0) and the problem.
var ErrImage = errors.New("model: invalid image")

// ImageConfig is implemented by the configuration types of families with a vision tower: what the
// coordinator needs to put a request's images into its prompt without running anything.
type ImageConfig interface {
	// ImagePrompter returns how the checkpoint in dir lays images out in a prompt, given its
	// tokenizer's token-to-id lookup. It wraps ErrNoImages when the checkpoint has no vision tower.
	ImagePrompter(dir string, tokenID func(token string) (int, bool)) (ImagePrompter, error)
}

// ImagePrompter turns a prompt's placeholders and encoded images into the ids the model runs. It is safe
// for concurrent use.
type ImagePrompter interface {
	// Placeholder is the text of one image's placeholder in a prompt ("<|image|>"), and PlaceholderID
	// its id.
	Placeholder() string
	PlaceholderID() int
	// MaxImages is the most images of one prompt.
	MaxImages() int
	// Expand checks images (each image's size is read from its header before it is decoded, so memory
	// stays bounded) and returns prompt with the i-th placeholder replaced by image i's layout: its
	// tokens and the slots its features fill. The placeholders must pair up with images. Errors wrap
	// ErrImage.
	Expand(prompt []int, images [][]byte) ([]int, error)
}
