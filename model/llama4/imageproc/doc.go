// Package imageproc is Llama 4's image processor: what HF transformers' Llama4ImageProcessor and
// Llama4Processor do to an image before the vision tower sees it (shared/reference/llama4-spec.md §6.1 and
// §6.3).
//
// Decode reads PNG, JPEG, GIF (the first frame) and WebP into 8-bit RGB, checking the dimensions in the
// header before any pixel is decoded, so a huge image costs no memory. Process picks the tile grid
// (BestFit, HF's get_best_fit over every grid of at most MaxTiles tiles), resizes the image keeping its
// aspect ratio with torch's antialiased bilinear resampling of uint8 images (Resize), pads it right and
// bottom with black, rescales and normalises in bfloat16 as HF does, cuts it into tiles row by row and,
// when there are several, appends the global tile (the whole image resized to one tile). The result is
// the vision tower's input, pixel values [tiles, 3, size, size] in float32 (every value a bfloat16), with
// the grid (HF's aspect_ratios).
//
// Expand lays out the prompt: every <|image|> id in a tokenised prompt becomes the image's tokens —
// <|image_start|>, per tile row the tiles' <|patch|> slots separated by <|tile_x_separator|> and ended by
// <|tile_y_separator|>, then <|image|> and the global tile's slots, and <|image_end|> — exactly as
// Llama4Processor writes them.
//
// Exactness: on an HF machine with AVX2 or AVX-512 (every current x86 server) torchvision resizes uint8
// images with integer weights in two passes, width first, rounding to uint8 after each; Resize does the
// same, so the pixel values match HF's bit for bit for PNG, GIF and lossless WebP input. JPEG decoders
// differ (Go's and libjpeg-turbo's inverse DCT and chroma upsampling), so JPEG pixel values may differ by
// a few levels. Translucent pixels are composited over white, as HF's convert_to_rgb does, with 8-bit
// rounding that may differ from Pillow's by one level.
package imageproc
