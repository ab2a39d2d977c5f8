package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/tokenizer"
)

// textPrompt reports whether generate's prompt is text (--prompt) rather than ids (--ids): exactly
// one of the two must be given.
func textPrompt(flags *flag.FlagSet, f generateFlags) (bool, error) {
	set := make(map[string]bool)
	flags.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	switch {
	case set["ids"] && set["prompt"]:
		return false, usagef("--ids and --prompt are mutually exclusive")
	case set["prompt"] && f.prompt == "":
		return false, usagef("--prompt is empty")
	case set["prompt"]:
		return true, nil
	case !set["ids"]:
		return false, usagef("give the prompt as --ids or --prompt")
	}
	return false, nil
}

// localPrompt is the prompt of the local `tpfleet generate`: --ids parsed, or --prompt encoded with
// the model directory's tokenizer, BOS added (HF's tokenizer(text)). tok is that tokenizer, for the
// output's text: loaded for --prompt, which fails without it, and for --ids when the directory has a
// tokenizer.json (one that does not load is then only logged); nil otherwise.
func localPrompt(flags *flag.FlagSet, f generateFlags, log *zap.Logger) (ids []int, tok *tokenizer.Tokenizer, err error) {
	text, err := textPrompt(flags, f)
	if err != nil {
		return nil, nil, err
	}
	if text {
		if tok, err = tokenizer.Load(f.dir); errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("--prompt needs the model's tokenizer: %w; give --ids", err)
		} else if err != nil {
			return nil, nil, err
		}
		return tok.Encode(f.prompt, true), tok, nil
	}
	if ids, err = parseIDs(f.ids); err != nil {
		return nil, nil, err
	}
	if _, serr := os.Stat(filepath.Join(f.dir, tokenizer.TokenizerFile)); serr == nil {
		if tok, err = tokenizer.Load(f.dir); err != nil {
			log.Warn("the model's tokenizer does not load; printing ids only", zap.Error(err))
			tok = nil
		}
	}
	return ids, tok, nil
}

// decodeText returns the text of ids, special tokens left out; ids the tokenizer does not know (a
// model vocabulary larger than the tokenizer's) give no text, as in the coordinator's responses.
func decodeText(tok *tokenizer.Tokenizer, ids []int) string {
	dec := tok.NewDecoder(true)
	var b strings.Builder
	for _, id := range ids {
		if piece, err := dec.Add(id); err == nil {
			b.WriteString(piece)
		}
	}
	b.WriteString(dec.Flush())
	return b.String()
}

// generateOutput is generate's --json object, the same for the local and the remote mode. Text is
// there when the model has a tokenizer (and the text is not empty).
type generateOutput struct {
	IDs          []int  `json:"ids"`
	FinishReason string `json:"finish_reason"`
	PromptTokens int    `json:"prompt_tokens"`
	Text         string `json:"text,omitempty"`
}

// writeGenerated prints a finished local generation: the JSON object with --json, else the text for a
// --prompt, else the ids.
func writeGenerated(w io.Writer, f generateFlags, out generateOutput) error {
	if f.json {
		return json.NewEncoder(w).Encode(out)
	}
	if f.prompt != "" {
		_, err := fmt.Fprintln(w, out.Text)
		return err
	}
	strs := make([]string, len(out.IDs))
	for i, id := range out.IDs {
		strs[i] = strconv.Itoa(id)
	}
	_, err := fmt.Fprintln(w, strings.Join(strs, " "))
	return err
}
