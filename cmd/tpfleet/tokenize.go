package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/tpfleet/tpfleet/tokenizer"
)

type tokenizeFlags struct {
	dir         string
	text        string
	chatJSON    string
	decode      string
	addSpecial  bool
	genPrompt   bool
	skipSpecial bool
	json        bool
}

// runTokenize encodes text or a chat conversation with a checkpoint's tokenizer, or decodes ids.
//
//	tpfleet tokenize --model DIR (--text S | --chat-json FILE | --decode 1,2,3) [--json]
func runTokenize(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f tokenizeFlags
	fs := flag.NewFlagSet("tokenize", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.dir, "model", "", "checkpoint directory (tokenizer.json, tokenizer_config.json)")
	fs.StringVar(&f.text, "text", "", "text to encode")
	fs.StringVar(&f.chatJSON, "chat-json", "", `JSON file with a conversation to render with the chat template and encode: [{"role": ..., "content": ...}, ...] or {"messages": [...]}`)
	fs.StringVar(&f.decode, "decode", "", "token ids to decode, comma-separated")
	fs.BoolVar(&f.addSpecial, "add-special", true, "with --text: add the tokenizer's special tokens (BOS)")
	fs.BoolVar(&f.genPrompt, "add-generation-prompt", true, "with --chat-json: end with the assistant header")
	fs.BoolVar(&f.skipSpecial, "skip-special", false, "with --decode: leave out special tokens")
	fs.BoolVar(&f.json, "json", false, `print one JSON object: {"ids": [...], "count": N} ("prompt" too for --chat-json), or {"text": ...} for --decode`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	var modes []string
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "text", "chat-json", "decode":
			modes = append(modes, "--"+fl.Name)
		}
	})
	if f.dir == "" {
		return usagef("--model is required")
	}
	if len(modes) != 1 {
		return usagef("give exactly one of --text, --chat-json and --decode (got %d)", len(modes))
	}
	var ids []int
	if modes[0] == "--decode" {
		var err error
		if ids, err = parseIDList("--decode", f.decode); err != nil {
			return err
		}
	}
	var messages []tokenizer.Message
	if modes[0] == "--chat-json" {
		var err error
		if messages, err = readMessages(f.chatJSON); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	tok, err := tokenizer.Load(f.dir)
	if err != nil {
		return err
	}
	switch modes[0] {
	case "--decode":
		text, err := tok.Decode(ids, f.skipSpecial)
		if err != nil {
			return err
		}
		if f.json {
			return writeJSON(stdout, struct {
				Text string `json:"text"`
			}{text})
		}
		_, err = fmt.Fprintln(stdout, text)
		return err
	case "--chat-json":
		prompt, err := tok.ApplyChatTemplate(messages, f.genPrompt)
		if err != nil {
			return err
		}
		return printIDs(stdout, tok.Encode(prompt, false), prompt, f.json)
	default:
		return printIDs(stdout, tok.Encode(f.text, f.addSpecial), "", f.json)
	}
}

// printIDs prints ids space-separated (as generate does), or as JSON with the rendered prompt when
// there is one.
func printIDs(w io.Writer, ids []int, prompt string, asJSON bool) error {
	if asJSON {
		return writeJSON(w, struct {
			IDs    []int  `json:"ids"`
			Count  int    `json:"count"`
			Prompt string `json:"prompt,omitempty"`
		}{ids, len(ids), prompt})
	}
	strs := make([]string, len(ids))
	for i, id := range ids {
		strs[i] = strconv.Itoa(id)
	}
	_, err := fmt.Fprintln(w, strings.Join(strs, " "))
	return err
}

// writeJSON writes v as one line of JSON, leaving <, > and & as they are (special tokens are full of
// them).
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// parseIDList parses comma-separated token ids given to the flag name.
func parseIDList(name, s string) ([]int, error) {
	if strings.TrimSpace(s) == "" {
		return nil, usagef("%s is empty", name)
	}
	parts := strings.Split(s, ",")
	ids := make([]int, len(parts))
	for i, p := range parts {
		v, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil {
			return nil, usagef("%s: %q is not an integer", name, p)
		}
		ids[i] = v
	}
	return ids, nil
}

// readMessages reads a conversation: a JSON array of {"role", "content"} or an object with "messages".
func readMessages(path string) ([]tokenizer.Message, error) {
	if path == "" {
		return nil, usagef("--chat-json is empty")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	data = bytes.TrimSpace(data)
	var messages []tokenizer.Message
	if len(data) > 0 && data[0] == '{' {
		var req struct {
			Messages []tokenizer.Message `json:"messages"`
		}
		err = json.Unmarshal(data, &req)
		messages = req.Messages
	} else {
		err = json.Unmarshal(data, &messages)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: want [{\"role\": ..., \"content\": \"...\"}, ...]: %w", path, err)
	}
	if len(messages) == 0 {
		return nil, fmt.Errorf("%s: no messages", path)
	}
	return messages, nil
}
