// Package tokenizer turns text into Llama 4 token ids and back, and renders chat conversations as
// prompts.
//
// It owns the Hugging Face tokenizer files of a checkpoint: tokenizer.json (byte-level BPE),
// tokenizer_config.json (bos/eos tokens, added tokens, chat template) and chat_template.jinja or
// chat_template.json. It imports nothing of the project, only the standard library,
// github.com/dlclark/regexp2 (the pre-tokenizer regex needs lookahead, which Go's regexp lacks) and
// github.com/ardanlabs/jinja (chat templates), so the server and the command line can both use it
// without pulling in the model.
//
// # Supported files
//
// [Load] accepts what Llama 4 ships (llama4-spec §5.4) and rejects anything else with an error that
// names it and wraps [ErrUnsupported]:
//
//   - model: BPE with vocab and merges ("a b" strings or ["a", "b"] pairs), ignore_merges honoured
//     (a pre-token that is itself in the vocabulary is one token), no dropout, no subword prefix or
//     suffix, no byte_fallback;
//   - normalizer: none;
//   - pre_tokenizer: Split steps (Regex or String pattern, behaviour Isolated) followed by ByteLevel
//     with add_prefix_space and use_regex false, bare or in a Sequence;
//   - post_processor: none, ByteLevel, TemplateProcessing (its "single" template), or a Sequence of
//     them;
//   - decoder: ByteLevel;
//   - added_tokens with their special, lstrip, rstrip and single_word flags;
//   - no truncation or padding.
//
// # Encoding and decoding
//
// [Tokenizer.Encode] first cuts out added tokens (special tokens written in the text become their ids,
// as transformers does by default), then splits the rest with the pre-tokenizer regex and encodes each
// piece with byte-level BPE. [Tokenizer.Decode] joins the tokens' bytes and replaces invalid UTF-8 with
// U+FFFD. For streaming, a [Decoder] from [Tokenizer.NewDecoder] takes one id at a time and returns
// only complete characters.
//
// # Chat
//
// [Tokenizer.ApplyChatTemplate] renders the checkpoint's Jinja chat template with transformers'
// settings, or Llama 4's format written in Go when the checkpoint has none. The rendered prompt begins
// with BOS, so [Tokenizer.EncodeChat] encodes it without adding special tokens again.
//
// # Errors
//
// Load returns [*FileError] values naming the file. Errors wrap [ErrUnsupported], [ErrMalformed],
// [ErrInvalidID] or [ErrChatTemplate]; test for them with errors.Is.
//
// # Concurrency
//
// A [Tokenizer] is immutable after Load and safe for concurrent use. A [Decoder] holds one stream's
// state and is not.
//
// # Test data
//
// testdata/tiny holds a Llama-4-style tokenizer learned from a small corpus (256 byte tokens, 234
// merges, 22 of Llama 4's special tokens at ids 490–511, Llama 4's chat template), so all its ids fit
// the 512-row test model fixtures. A copy lives in the repository's testdata/tokenizer for other
// packages' tests. Regenerate both with go generate.
package tokenizer

//go:generate go test -run TestTestdataUpToDate -update .
