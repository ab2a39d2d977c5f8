package tokenizer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"strconv"
	"strings"
	"unicode"

	"github.com/ardanlabs/jinja"
)

// Message is one turn of a conversation.
type Message struct {
	Role    string `json:"role"`    // "system", "user", "assistant", "tool" or "ipython"
	Content string `json:"content"` // the text of the turn
	// ToolCalls are an assistant turn's function calls (the template's message.tool_calls, set only
	// when there are some); ToolCallID is a tool turn's answer to one (message.tool_call_id).
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// ToolCall is a function call of an assistant turn, as the template reads it:
// {"id", "type": "function", "function": {"name", "arguments"}}. Arguments is a JSON value (an
// object), given to the template as that value, not as the string OpenAI's API carries (as vLLM parses
// it before it renders).
type ToolCall struct {
	ID        string          `json:"id,omitempty"`
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

// Llama 4's chat tokens (llama4-spec §5.5).
const (
	headerStart = "<|header_start|>"
	headerEnd   = "<|header_end|>"
	endOfTurn   = "<|eot|>"
)

// ApplyChatTemplate renders a conversation as a prompt string. With a chat template from the
// checkpoint it renders that with Jinja under transformers' settings (trim_blocks, lstrip_blocks,
// raise_exception) and the variables messages, add_generation_prompt, bos_token, eos_token, pad_token,
// tools and documents (the last two none). Without one it writes Llama 4's format itself:
//
//	<|begin_of_text|><|header_start|>role<|header_end|>\n\ncontent<|eot|>…<|header_start|>assistant<|header_end|>\n\n
//
// matching Llama 4's template (the first system message is stripped of surrounding whitespace; tool
// turns are written as role ipython with JSON-quoted content). The result already starts with BOS:
// tokenize it with addSpecial=false, as [Tokenizer.EncodeChat] does (llama4-spec §7, trap 15).
//
// Errors wrap [ErrChatTemplate].
func (t *Tokenizer) ApplyChatTemplate(messages []Message, addGenerationPrompt bool) (string, error) {
	return t.ApplyChatTemplateTools(messages, nil, addGenerationPrompt)
}

// ApplyChatTemplateTools is ApplyChatTemplate with tools: each a JSON object as OpenAI's API sends it
// ({"type": "function", "function": {"name", "description", "parameters"}}), given to the template as
// the variable tools in order (none when there are none), as transformers' apply_chat_template(tools=…)
// does. The template's tojson writes them as Python's json.dumps (keys in order, ensure_ascii=False,
// with indent when asked). Tools and tool calls need the checkpoint's chat template.
func (t *Tokenizer) ApplyChatTemplateTools(messages []Message, tools []json.RawMessage, addGenerationPrompt bool) (string, error) {
	if len(messages) == 0 {
		return "", fmt.Errorf("%w: no messages", ErrChatTemplate)
	}
	if t.template == nil {
		for _, m := range messages {
			if len(m.ToolCalls) > 0 {
				return "", fmt.Errorf("%w: tool calls need the checkpoint's chat template", ErrChatTemplate)
			}
		}
		if len(tools) > 0 {
			return "", fmt.Errorf("%w: tools need the checkpoint's chat template", ErrChatTemplate)
		}
		return t.llama4Chat(messages, addGenerationPrompt)
	}
	list := make([]jinja.Value, len(messages))
	for i, m := range messages {
		v := jinja.NewDict()
		d := v.AsDict()
		d.Set("role", jinja.NewString(m.Role))
		d.Set("content", jinja.NewString(m.Content))
		if len(m.ToolCalls) > 0 {
			calls := make([]jinja.Value, len(m.ToolCalls))
			for k, c := range m.ToolCalls {
				args, err := jsonValue(c.Arguments)
				if err != nil {
					return "", fmt.Errorf("%w: messages[%d].tool_calls[%d].arguments: %v", ErrChatTemplate, i, k, err)
				}
				fn := jinja.NewDict()
				fn.AsDict().Set("name", jinja.NewString(c.Name))
				fn.AsDict().Set("arguments", args)
				call := jinja.NewDict()
				if c.ID != "" {
					call.AsDict().Set("id", jinja.NewString(c.ID))
				}
				call.AsDict().Set("type", jinja.NewString("function"))
				call.AsDict().Set("function", fn)
				calls[k] = call
			}
			d.Set("tool_calls", jinja.NewList(calls))
		}
		if m.ToolCallID != "" {
			d.Set("tool_call_id", jinja.NewString(m.ToolCallID))
		}
		list[i] = v
	}
	toolsValue := jinja.None()
	if len(tools) > 0 {
		vs := make([]jinja.Value, len(tools))
		for i, raw := range tools {
			v, err := jsonValue(raw)
			if err != nil {
				return "", fmt.Errorf("%w: tools[%d]: %v", ErrChatTemplate, i, err)
			}
			vs[i] = v
		}
		toolsValue = jinja.NewList(vs)
	}
	data := map[string]jinja.Value{
		"messages":              jinja.NewList(list),
		"add_generation_prompt": jinja.NewBool(addGenerationPrompt),
		"tools":                 toolsValue,
		"documents":             jinja.None(),
		pyJSONName:              jinja.NewCallable(pyJSONName, pyJSONCallable),
	}
	for name, s := range map[string]string{"bos_token": t.bosToken, "eos_token": t.eosToken, "pad_token": t.padToken} {
		if s != "" {
			data[name] = jinja.NewString(s)
		}
	}
	out, err := t.template.RenderValues(data)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrChatTemplate, err)
	}
	return out, nil
}

// EncodeChat renders a conversation with [Tokenizer.ApplyChatTemplate] and encodes it without adding
// special tokens (the template writes BOS itself).
func (t *Tokenizer) EncodeChat(messages []Message, addGenerationPrompt bool) ([]int, error) {
	return t.EncodeChatTools(messages, nil, addGenerationPrompt)
}

// EncodeChatTools is EncodeChat with tools (see [Tokenizer.ApplyChatTemplateTools]).
func (t *Tokenizer) EncodeChatTools(messages []Message, tools []json.RawMessage, addGenerationPrompt bool) ([]int, error) {
	s, err := t.ApplyChatTemplateTools(messages, tools, addGenerationPrompt)
	if err != nil {
		return nil, err
	}
	return t.Encode(s, false), nil
}

// jsonValue turns a JSON value into a Jinja value, objects with their keys in order, integers as
// integers (Python's json.loads).
func jsonValue(raw json.RawMessage) (jinja.Value, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return jinja.Value{}, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return jinja.Value{}, errors.New("data after the JSON value")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (jinja.Value, error) {
	tok, err := dec.Token()
	if err != nil {
		return jinja.Value{}, err
	}
	switch tok := tok.(type) {
	case json.Delim:
		switch tok {
		case '{':
			d := jinja.NewDict()
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return jinja.Value{}, err
				}
				v, err := decodeValue(dec)
				if err != nil {
					return jinja.Value{}, err
				}
				d.AsDict().Set(k.(string), v)
			}
			_, err := dec.Token() // '}'
			return d, err
		case '[':
			var items []jinja.Value
			for dec.More() {
				v, err := decodeValue(dec)
				if err != nil {
					return jinja.Value{}, err
				}
				items = append(items, v)
			}
			_, err := dec.Token() // ']'
			if items == nil {
				items = []jinja.Value{}
			}
			return jinja.NewList(items), err
		}
		return jinja.Value{}, fmt.Errorf("unexpected %v", tok)
	case nil:
		return jinja.None(), nil
	default:
		return jinja.FromGoValue(tok), nil // bool, string, json.Number (an integer stays one)
	}
}

// pyJSONName is the global through which templates' tojson(indent=N) runs (see rewriteTojsonIndent):
// the Jinja engine's own writes Go's json.MarshalIndent (keys sorted, HTML escaped).
const pyJSONName = "tpfleet_tojson_indent"

// tojsonIndent finds `EXPR | tojson(indent=N)` in a template, EXPR a variable with attribute or index
// accesses.
var tojsonIndent = regexp.MustCompile(`([A-Za-z_][\w.]*(?:\[[^\]]*\])*)\s*\|\s*tojson\(\s*indent\s*=\s*(\d+)\s*\)`)

// rewriteTojsonIndent turns `EXPR | tojson(indent=N)` into a call of pyJSONName(EXPR, N), which writes
// what transformers' tojson filter writes: json.dumps(EXPR, ensure_ascii=False, indent=N).
func rewriteTojsonIndent(src string) string {
	return tojsonIndent.ReplaceAllString(src, pyJSONName+"($1, $2)")
}

// pyJSONCallable is the Jinja callable of pyJSONName.
func pyJSONCallable(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 2 || !args[1].IsInt() {
		return jinja.Value{}, fmt.Errorf("%s(value, indent): %d arguments", pyJSONName, len(args))
	}
	var b strings.Builder
	if err := pyJSON(&b, args[0], int(args[1].AsInt()), 0); err != nil {
		return jinja.Value{}, err
	}
	return jinja.NewString(b.String()), nil
}

// pyJSON writes v as Python's json.dumps(v, ensure_ascii=False, indent=indent) does (indent > 0), at
// nesting depth level.
func pyJSON(b *strings.Builder, v jinja.Value, indent, level int) error {
	nl := func(l int) { b.WriteString("\n" + strings.Repeat(" ", indent*l)) }
	switch {
	case v.IsNone() || v.IsUndefined():
		b.WriteString("null")
	case v.IsBool():
		b.WriteString(map[bool]string{true: "true", false: "false"}[v.AsBool()])
	case v.IsInt():
		b.WriteString(strconv.FormatInt(v.AsInt(), 10))
	case v.IsFloat():
		f := v.AsFloat()
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return fmt.Errorf("tojson: cannot encode %v", f)
		}
		b.WriteString(pyFloat(f))
	case v.IsString():
		b.WriteString(pythonJSONString(v.AsString()))
	case v.IsList():
		items := v.AsList().Items
		if len(items) == 0 {
			b.WriteString("[]")
			return nil
		}
		b.WriteByte('[')
		for i, item := range items {
			if i > 0 {
				b.WriteByte(',')
			}
			nl(level + 1)
			if err := pyJSON(b, item, indent, level+1); err != nil {
				return err
			}
		}
		nl(level)
		b.WriteByte(']')
	case v.IsDict():
		d := v.AsDict()
		keys := d.OrderedKeys()
		if len(keys) == 0 {
			b.WriteString("{}")
			return nil
		}
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			nl(level + 1)
			b.WriteString(pythonJSONString(k) + ": ")
			x, _ := d.Get(k)
			if err := pyJSON(b, x, indent, level+1); err != nil {
				return err
			}
		}
		nl(level)
		b.WriteByte('}')
	default:
		return fmt.Errorf("tojson: cannot encode a %v", v)
	}
	return nil
}

// pyFloat is Python's repr of a float: the shortest digits that round-trip, with ".0" on integral
// values and an exponent below 1e-4 and from 1e16.
func pyFloat(f float64) string {
	a := math.Abs(f)
	if a != 0 && (a < 1e-4 || a >= 1e16) {
		s := strconv.FormatFloat(f, 'e', -1, 64) // 1e-05, 1.5e+16
		mant, exp, _ := strings.Cut(s, "e")
		sign, digits := exp[:1], strings.TrimLeft(exp[1:], "0")
		if len(digits) < 2 {
			digits = strings.Repeat("0", 2-len(digits)) + digits
		}
		return mant + "e" + sign + digits
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// llama4Chat writes Llama 4's chat format the way its template does for plain text messages.
func (t *Tokenizer) llama4Chat(messages []Message, addGenerationPrompt bool) (string, error) {
	for _, s := range []string{headerStart, headerEnd, endOfTurn} {
		if _, ok := t.addedIDs[s]; !ok {
			return "", fmt.Errorf("%w: the checkpoint has no chat_template and no %s token for Llama 4's format", ErrChatTemplate, s)
		}
	}
	var b strings.Builder
	b.WriteString(t.bosToken)
	for i, m := range messages {
		role, content := m.Role, m.Content
		switch {
		case i == 0 && role == "system":
			content = strings.TrimFunc(content, isPythonSpace)
		case role == "tool" || role == "ipython":
			// The template writes content|tojson when content is iterable, which a string is.
			role = "ipython"
			content = pythonJSONString(content)
		}
		b.WriteString(headerStart + role + headerEnd + "\n\n" + content + endOfTurn)
	}
	if addGenerationPrompt {
		b.WriteString(headerStart + "assistant" + headerEnd + "\n\n")
	}
	return b.String(), nil
}

// isPythonSpace is str.isspace, which Jinja's trim filter (str.strip) uses: Unicode White_Space plus the
// separators U+001C–U+001F.
func isPythonSpace(r rune) bool { return unicode.IsSpace(r) || r >= 0x1C && r <= 0x1F }

// pythonJSONString is json.dumps(s, ensure_ascii=False), as transformers' tojson writes a string.
func pythonJSONString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		default:
			if r < 0x20 {
				fmt.Fprintf(&b, `\u%04x`, r)
			} else {
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
	return b.String()
}
