package tokenizer

import (
	"errors"
	"io/fs"
)

// Sentinel errors. Errors returned by this package wrap one of them; test with errors.Is.
var (
	// ErrUnsupported marks a tokenizer.json or tokenizer_config.json that uses a component or setting
	// this package does not implement (another model type, a normalizer, a Split behaviour other than
	// Isolated, …). The message names it.
	ErrUnsupported = errors.New("tokenizer: unsupported")
	// ErrMalformed marks a file that is not valid JSON or breaks the format's rules (a merge of tokens
	// missing from the vocabulary, two tokens with one id, …).
	ErrMalformed = errors.New("tokenizer: malformed")
	// ErrInvalidID marks a token id that is negative or names no token.
	ErrInvalidID = errors.New("tokenizer: invalid token id")
	// ErrChatTemplate marks a chat template that does not compile or fails to render (including the
	// template's own raise_exception), and a conversation that cannot be rendered.
	ErrChatTemplate = errors.New("tokenizer: chat template")
)

// FileError reports a problem with one file of a tokenizer directory.
type FileError struct {
	Path string // the file
	Err  error  // what is wrong; wraps a sentinel or an I/O error
}

func (e *FileError) Error() string {
	var pe *fs.PathError
	if errors.As(e.Err, &pe) && pe.Path == e.Path {
		return e.Err.Error() // already names the file
	}
	return e.Path + ": " + e.Err.Error()
}

// Unwrap returns e.Err.
func (e *FileError) Unwrap() error { return e.Err }
