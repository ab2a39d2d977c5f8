package tokenizer

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/tokenizer/internal/tinybpe"
)

// loadTinyNoTemplate loads the tiny tokenizer with a tokenizer_config.json that has no chat_template.
func loadTinyNoTemplate(t *testing.T) *Tokenizer {
	t.Helper()
	o := tinybpe.TinyOptions()
	o.ChatTemplate = ""
	tokJSON, cfgJSON, err := tinybpe.Build(o)
	if err != nil {
		t.Fatal(err)
	}
	tk := loadFiles(t, map[string][]byte{TokenizerFile: tokJSON, ConfigFile: cfgJSON})
	if tk.template != nil {
		t.Fatal("tokenizer without chat_template has a template")
	}
	return tk
}

const (
	hs  = "<|header_start|>"
	he  = "<|header_end|>\n\n"
	eot = "<|eot|>"
)

var chatCases = []struct {
	name      string
	messages  []Message
	genPrompt bool
	want      string
}{
	{
		name: "system and user",
		messages: []Message{
			{Role: "system", Content: "You are a helpful assistant."},
			{Role: "user", Content: "What is the capital of France?"},
		},
		genPrompt: true,
		want: "<|begin_of_text|>" + hs + "system" + he + "You are a helpful assistant." + eot +
			hs + "user" + he + "What is the capital of France?" + eot + hs + "assistant" + he,
	},
	{
		name: "no generation prompt",
		messages: []Message{
			{Role: "system", Content: "You are a helpful assistant."},
			{Role: "user", Content: "What is the capital of France?"},
		},
		want: "<|begin_of_text|>" + hs + "system" + he + "You are a helpful assistant." + eot +
			hs + "user" + he + "What is the capital of France?" + eot,
	},
	{
		name: "system message is trimmed, others are not",
		messages: []Message{
			{Role: "system", Content: " \n Be brief.\t\n"},
			{Role: "user", Content: "  hi  "},
		},
		genPrompt: true,
		want: "<|begin_of_text|>" + hs + "system" + he + "Be brief." + eot +
			hs + "user" + he + "  hi  " + eot + hs + "assistant" + he,
	},
	{
		name: "multi-turn without system",
		messages: []Message{
			{Role: "user", Content: "Hello"},
			{Role: "assistant", Content: "Hi! How can I help?"},
			{Role: "user", Content: "Tell me a joke.\n"},
			{Role: "system", Content: " late system "},
		},
		genPrompt: true,
		want: "<|begin_of_text|>" + hs + "user" + he + "Hello" + eot + hs + "assistant" + he + "Hi! How can I help?" + eot +
			hs + "user" + he + "Tell me a joke.\n" + eot + hs + "system" + he + " late system " + eot + hs + "assistant" + he,
	},
	{
		name: "special tokens and unicode in content",
		messages: []Message{
			{Role: "user", Content: "你好 👋 <|eot|> مرحبا"},
		},
		genPrompt: true,
		want:      "<|begin_of_text|>" + hs + "user" + he + "你好 👋 <|eot|> مرحبا" + eot + hs + "assistant" + he,
	},
}

// TestChatTemplateMatchesFallback renders conversations with Llama 4's Jinja template and with the Go
// fallback and checks both give the expected prompt.
func TestChatTemplateMatchesFallback(t *testing.T) {
	jinjaTok, goTok := loadTiny(t), loadTinyNoTemplate(t)
	if jinjaTok.template == nil {
		t.Fatal("tiny tokenizer has no chat template")
	}
	for _, c := range chatCases {
		for _, tk := range []struct {
			name string
			t    *Tokenizer
		}{{"jinja", jinjaTok}, {"fallback", goTok}} {
			got, err := tk.t.ApplyChatTemplate(c.messages, c.genPrompt)
			if err != nil || got != c.want {
				t.Errorf("%s: %s: ApplyChatTemplate = %q, %v\nwant %q", c.name, tk.name, got, err, c.want)
			}
		}
	}
}

// TestChatToolTurn checks tool results in both paths: role ipython, content as a JSON string (a Python
// string is iterable, so the template pipes it through tojson).
func TestChatToolTurn(t *testing.T) {
	msgs := []Message{
		{Role: "user", Content: "Weather in Paris?"},
		{Role: "tool", Content: `{"temp": 20, "sky": "clear"}`},
	}
	want := "<|begin_of_text|>" + hs + "user" + he + "Weather in Paris?" + eot +
		hs + "ipython" + he + `"{\"temp\": 20, \"sky\": \"clear\"}"` + eot + hs + "assistant" + he
	got, err := loadTinyNoTemplate(t).ApplyChatTemplate(msgs, true)
	if err != nil || got != want {
		t.Errorf("fallback ApplyChatTemplate(tool) = %q, %v\nwant %q", got, err, want)
	}
	got, err = loadTiny(t).ApplyChatTemplate(msgs, true)
	if err != nil || got != want {
		t.Errorf("jinja ApplyChatTemplate(tool) = %q, %v\nwant %q", got, err, want)
	}
	if got := pythonJSONString("a\"b\\c\nd\x01\u2028é"); got != `"a\"b\\c\nd\u0001`+"\u2028é\"" {
		t.Errorf("pythonJSONString = %q", got)
	}
}

func TestEncodeChatHasOneBOS(t *testing.T) {
	for _, tk := range []*Tokenizer{loadTiny(t), loadTinyNoTemplate(t), loadLlama4Layout(t)} {
		ids, err := tk.EncodeChat(chatCases[0].messages, true)
		if err != nil {
			t.Fatal(err)
		}
		bos, _ := tk.BOS()
		if ids[0] != bos || slices.Contains(ids[1:], bos) {
			t.Errorf("EncodeChat = %v, want one BOS (%d) at the start", ids, bos)
		}
		hsID, _ := tk.TokenID("<|header_start|>")
		if ids[1] != hsID {
			t.Errorf("EncodeChat = %v, want <|header_start|> (%d) second", ids, hsID)
		}
		text, err := tk.Decode(ids, false)
		if err != nil || text != chatCases[0].want {
			t.Errorf("Decode(EncodeChat) = %q, %v, want %q", text, err, chatCases[0].want)
		}
	}
}

func TestChatTemplateSources(t *testing.T) {
	tokJSON, cfgJSON := tinyFiles(t)
	msgs := []Message{{Role: "user", Content: "hi"}}
	tests := []struct {
		name  string
		files map[string][]byte
		want  string
	}{
		{"config", map[string][]byte{ConfigFile: []byte(`{"bos_token": "<|begin_of_text|>", "chat_template": "C{{ bos_token }}{{ messages[0].content }}"}`)}, "C<|begin_of_text|>hi"},
		{"jinja file wins", map[string][]byte{ConfigFile: cfgJSON, TemplateFile: []byte("J{{ messages|length }}")}, "J1"},
		{"json file", map[string][]byte{TemplateJSONFile: []byte(`{"chat_template": "N{{ add_generation_prompt }}"}`)}, "NTrue"},
		{"config over json file", map[string][]byte{
			ConfigFile:       []byte(`{"chat_template": "config"}`),
			TemplateJSONFile: []byte(`{"chat_template": "json"}`),
		}, "config"},
		{"named list", map[string][]byte{ConfigFile: []byte(`{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}], "eos_token": "<|eot|>"}`)}, "D<|eot|>"},
		{"tools and documents are none", map[string][]byte{ConfigFile: []byte(`{"chat_template": "{{ tools is none }} {{ documents is none }} {{ tools is defined }}"}`)}, "True True True"},
	}
	for _, tt := range tests {
		tt.files[TokenizerFile] = tokJSON
		tk := loadFiles(t, tt.files)
		got, err := tk.ApplyChatTemplate(msgs, true)
		if err != nil || got != tt.want {
			t.Errorf("%s: ApplyChatTemplate = %q, %v, want %q", tt.name, got, err, tt.want)
		}
	}
}

func TestChatTemplateErrors(t *testing.T) {
	tokJSON, _ := tinyFiles(t)
	raising := loadFiles(t, map[string][]byte{TokenizerFile: tokJSON, ConfigFile: []byte(
		`{"chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"}`)})
	if got, err := raising.ApplyChatTemplate([]Message{{Role: "user", Content: "x"}}, false); got != "ok" || err != nil {
		t.Errorf("ApplyChatTemplate(user) = %q, %v, want ok", got, err)
	}
	_, err := raising.ApplyChatTemplate([]Message{{Role: "assistant", Content: "x"}}, false)
	if !errors.Is(err, ErrChatTemplate) || !strings.Contains(err.Error(), "first message must be from the user") {
		t.Errorf("ApplyChatTemplate(raise_exception) error = %v, want ErrChatTemplate with the message", err)
	}
	for _, tk := range []*Tokenizer{loadTiny(t), loadTinyNoTemplate(t)} {
		if _, err := tk.ApplyChatTemplate(nil, true); !errors.Is(err, ErrChatTemplate) {
			t.Errorf("ApplyChatTemplate(nil) error = %v, want ErrChatTemplate", err)
		}
		if _, err := tk.EncodeChat(nil, true); !errors.Is(err, ErrChatTemplate) {
			t.Errorf("EncodeChat(nil) error = %v, want ErrChatTemplate", err)
		}
	}
	// Without a template the fallback needs Llama 4's header tokens.
	noHeaders := loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, minimalFile(nil, nil, true))})
	if _, err := noHeaders.ApplyChatTemplate([]Message{{Role: "user", Content: "x"}}, true); !errors.Is(err, ErrChatTemplate) || !strings.Contains(err.Error(), "<|header_start|>") {
		t.Errorf("ApplyChatTemplate without template or header tokens: error = %v, want ErrChatTemplate naming <|header_start|>", err)
	}
}
