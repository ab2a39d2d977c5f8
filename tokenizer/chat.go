package tokenizer

import (
	"fmt"
	"strings"
	"unicode"

	"github.com/ardanlabs/jinja"
)

// Message is one turn of a conversation.
type Message struct {
	Role    string `json:"role"`    // "system", "user", "assistant", "tool" or "ipython"
	Content string `json:"content"` // the text of the turn
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
	if len(messages) == 0 {
		return "", fmt.Errorf("%w: no messages", ErrChatTemplate)
	}
	if t.template == nil {
		return t.llama4Chat(messages, addGenerationPrompt)
	}
	list := make([]jinja.Value, len(messages))
	for i, m := range messages {
		v := jinja.NewDict()
		d := v.AsDict()
		d.Set("role", jinja.NewString(m.Role))
		d.Set("content", jinja.NewString(m.Content))
		list[i] = v
	}
	data := map[string]jinja.Value{
		"messages":              jinja.NewList(list),
		"add_generation_prompt": jinja.NewBool(addGenerationPrompt),
		"tools":                 jinja.None(),
		"documents":             jinja.None(),
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
	s, err := t.ApplyChatTemplate(messages, addGenerationPrompt)
	if err != nil {
		return nil, err
	}
	return t.Encode(s, false), nil
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
