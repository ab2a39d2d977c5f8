package gateway

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// ToolCall is a function call of a chat turn: an assistant message's in a request, or one the model
// made. Arguments is a JSON value (an object), not OpenAI's string form.
type ToolCall struct {
	ID        string
	Name      string
	Arguments json.RawMessage
}

// toolChoice is how a chat request's tools are used.
type toolChoice int

const (
	toolsNone toolChoice = iota // no tools, or tool_choice "none": the tools are rendered, the output is text
	toolsAuto                   // the model may call them: its output is parsed for tool calls
)

// readTools checks a chat request's tools and tool_choice. Each tool is {"type": "function",
// "function": {"name", ...}}. tool_choice "auto" (the default with tools) parses the model's output for
// calls; "none" renders the tools but leaves the output text (as vLLM does); "required" and a named
// function need constrained decoding, which this gateway does not have: they are refused.
func readTools(raw []json.RawMessage, choice json.RawMessage) ([]json.RawMessage, toolChoice, error) {
	for i, t := range raw {
		var tool struct {
			Type     string `json:"type"`
			Function *struct {
				Name string `json:"name"`
			} `json:"function"`
		}
		if err := json.Unmarshal(t, &tool); err != nil || tool.Type != "function" || tool.Function == nil || tool.Function.Name == "" {
			return nil, 0, invalid(`tools[%d]: want {"type": "function", "function": {"name": ..., "parameters": ...}}`, i)
		}
	}
	var mode string
	switch c := bytes.TrimSpace(choice); {
	case isEmptyJSON(c):
		mode = "auto"
	case json.Unmarshal(c, &mode) == nil:
	default:
		return nil, 0, invalid("tool_choice %s: a named function needs constrained decoding, which is not supported; use \"auto\"", c)
	}
	switch {
	case mode == "none":
		return raw, toolsNone, nil
	case mode == "auto" && len(raw) > 0:
		return raw, toolsAuto, nil
	case mode == "auto":
		return nil, toolsNone, nil
	case mode == "required":
		return nil, 0, invalid(`tool_choice "required" needs constrained decoding, which is not supported; use "auto"`)
	}
	return nil, 0, invalid("tool_choice %q: want \"none\", \"auto\" or \"required\"", mode)
}

// chatToolCall is a tool call of a request's assistant message, as OpenAI's API sends it.
type chatToolCall struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"` // a JSON string holding the arguments' JSON (or, leniently, the object)
	} `json:"function"`
}

// toolCalls reads an assistant message's tool calls; the arguments' JSON string is parsed, as vLLM
// parses it before rendering.
func toolCalls(in []chatToolCall) ([]ToolCall, error) {
	var out []ToolCall
	for k, c := range in {
		if c.Function.Name == "" {
			return nil, fmt.Errorf("tool_calls[%d]: no function name", k)
		}
		args := bytes.TrimSpace(c.Function.Arguments)
		var s string
		if json.Unmarshal(args, &s) == nil {
			args = []byte(s)
		}
		if len(args) == 0 {
			args = []byte("{}")
		}
		if !json.Valid(args) {
			return nil, fmt.Errorf("tool_calls[%d].function.arguments is not JSON", k)
		}
		out = append(out, ToolCall{ID: c.ID, Name: c.Function.Name, Arguments: json.RawMessage(args)})
	}
	return out, nil
}

// parseToolCalls reads the tool calls in a model's output in Llama 4's JSON form (its chat template asks
// for {"name": function name, "parameters": {...}}), as vLLM's llama3_json parser does: the text (special
// tokens such as <|python_start|> left out), after leading white space, is one or more JSON objects with
// a "name" and "parameters" (or "arguments"), separated by ";" or white space. Anything else is not a
// tool call: ok is false and the text is the message's content.
func parseToolCalls(text string) (calls []ToolCall, ok bool) {
	rest := strings.TrimLeft(text, " \t\r\n")
	if !strings.HasPrefix(rest, "{") {
		return nil, false
	}
	dec := json.NewDecoder(strings.NewReader(rest))
	for {
		var obj struct {
			Name       *string         `json:"name"`
			Parameters json.RawMessage `json:"parameters"`
			Arguments  json.RawMessage `json:"arguments"`
		}
		if err := dec.Decode(&obj); err != nil {
			return nil, false
		}
		args := obj.Arguments
		if args == nil {
			args = obj.Parameters
		}
		if obj.Name == nil || *obj.Name == "" || args == nil {
			return nil, false
		}
		py, err := pythonJSON(args)
		if err != nil {
			return nil, false
		}
		calls = append(calls, ToolCall{Name: *obj.Name, Arguments: json.RawMessage(py)})
		// What follows: the end, or a separator and the next call.
		tail := strings.TrimLeft(rest[dec.InputOffset():], " \t\r\n")
		if tail == "" {
			return calls, true
		}
		tail = strings.TrimLeft(strings.TrimPrefix(tail, ";"), " \t\r\n")
		if !strings.HasPrefix(tail, "{") {
			return nil, false
		}
		rest = tail
		dec = json.NewDecoder(strings.NewReader(rest))
	}
}

// pythonJSON rewrites a JSON value as Python's json.dumps(value, ensure_ascii=False) writes it (", " and
// ": " separators, keys in order), the arguments string vLLM sends.
func pythonJSON(raw json.RawMessage) (string, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var b strings.Builder
	if err := writePython(&b, dec); err != nil {
		return "", err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return "", errors.New("data after the JSON value")
	}
	return b.String(), nil
}

func writePython(b *strings.Builder, dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch tok := tok.(type) {
	case json.Delim:
		end := map[json.Delim]byte{'{': '}', '[': ']'}[tok]
		b.WriteByte(byte(tok))
		for i := 0; dec.More(); i++ {
			if i > 0 {
				b.WriteString(", ")
			}
			if tok == '{' {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				ks, _ := marshalNoEscape(k)
				b.Write(ks)
				b.WriteString(": ")
			}
			if err := writePython(b, dec); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil {
			return err
		}
		b.WriteByte(end)
	case nil:
		b.WriteString("null")
	default:
		s, err := marshalNoEscape(tok)
		if err != nil {
			return err
		}
		b.Write(s)
	}
	return nil
}

// ChatToolCall is a tool call of a chat response's message or chunk's delta (Index is set in chunks).
type ChatToolCall struct {
	Index    *int             `json:"index,omitempty"`
	ID       string           `json:"id"`
	Type     string           `json:"type"`
	Function ChatToolFunction `json:"function"`
}

// ChatToolFunction is a tool call's function: its name and its arguments as a JSON string.
type ChatToolFunction struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// chatToolCalls turns parsed calls into a response's tool_calls, with new ids (vLLM's form,
// chatcmpl-tool-…), indexed for a chunk when indexed is set.
func chatToolCalls(calls []ToolCall, indexed bool) []ChatToolCall {
	out := make([]ChatToolCall, len(calls))
	for i, c := range calls {
		out[i] = ChatToolCall{ID: "chatcmpl-tool-" + strings.ToLower(rand.Text()), Type: "function",
			Function: ChatToolFunction{Name: c.Name, Arguments: string(c.Arguments)}}
		if indexed {
			out[i].Index = &i
		}
	}
	return out
}

// FinishToolCalls is a chat choice's finish_reason when the model called tools.
const FinishToolCalls = "tool_calls"
