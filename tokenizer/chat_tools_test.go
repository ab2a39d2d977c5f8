package tokenizer

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// chatGolden is testdata/tokenizer/chat_template_golden.json, made by
// scripts/fixtures/make_chat_template_golden.py: Llama 4's template rendered by transformers'
// apply_chat_template over conversations with tools (on the GPU machine, where transformers is installed;
// rendered_by names the version).
type chatGolden struct {
	RenderedBy string `json:"rendered_by"`
	Cases      []struct {
		Name     string `json:"name"`
		Messages []struct {
			Role       string `json:"role"`
			Content    string `json:"content"`
			ToolCallID string `json:"tool_call_id"`
			ToolCalls  []struct {
				ID       string `json:"id"`
				Function struct {
					Name      string          `json:"name"`
					Arguments json.RawMessage `json:"arguments"`
				} `json:"function"`
			} `json:"tool_calls"`
		} `json:"messages"`
		Tools               []json.RawMessage `json:"tools"`
		AddGenerationPrompt bool              `json:"add_generation_prompt"`
		Text                string            `json:"text"`
	} `json:"cases"`
}

// TestChatTemplateToolsGolden renders the golden's conversations with tools and tool calls and compares
// them with HF's rendering, byte for byte (tojson(indent=4) of the tools with their keys in order).
func TestChatTemplateToolsGolden(t *testing.T) {
	data, err := os.ReadFile("../testdata/tokenizer/chat_template_golden.json")
	if err != nil {
		t.Fatal(err)
	}
	var g chatGolden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Cases) == 0 {
		t.Fatal("no cases in the golden")
	}
	if !strings.HasPrefix(g.RenderedBy, "transformers ") {
		t.Fatalf("golden rendered by %q, want transformers: run python3 scripts/fixtures/make_chat_template_golden.py where transformers is installed", g.RenderedBy)
	}
	t.Logf("golden rendered by %s", g.RenderedBy)
	tok, err := Load("../testdata/tokenizer")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range g.Cases {
		msgs := make([]Message, len(c.Messages))
		for i, m := range c.Messages {
			msgs[i] = Message{Role: m.Role, Content: m.Content, ToolCallID: m.ToolCallID}
			for _, tc := range m.ToolCalls {
				msgs[i].ToolCalls = append(msgs[i].ToolCalls, ToolCall{ID: tc.ID, Name: tc.Function.Name, Arguments: tc.Function.Arguments})
			}
		}
		got, err := tok.ApplyChatTemplateTools(msgs, c.Tools, c.AddGenerationPrompt)
		if err != nil || got != c.Text {
			t.Errorf("%s: ApplyChatTemplateTools = %v\n%s\nwant (%s)\n%s", c.Name, err, got, g.RenderedBy, c.Text)
		}
	}
}

// TestPyJSON: tojson(indent=N) writes Python's json.dumps(ensure_ascii=False, indent=N): keys in order,
// no HTML escaping, floats as Python's repr.
func TestPyJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"b": 1, "a": [true, null, "<&>é"], "e": {}, "l": []}`, "{\n  \"b\": 1,\n  \"a\": [\n    true,\n    null,\n    \"<&>é\"\n  ],\n  \"e\": {},\n  \"l\": []\n}"},
		{`[1.0, 0.5, 1e-5, 1e16, 123456789.0, -2.5e-7, 3]`, "[\n  1.0,\n  0.5,\n  1e-05,\n  1e+16,\n  123456789.0,\n  -2.5e-07,\n  3\n]"},
		{`"x\ny"`, `"x\ny"`},
	} {
		v, err := jsonValue(json.RawMessage(tc.in))
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		if err := pyJSON(&b, v, 2, 0); err != nil || b.String() != tc.want {
			t.Errorf("pyJSON(%s) = %q, %v; want %q", tc.in, b.String(), err, tc.want)
		}
	}
	for _, src := range []string{"{{ t | tojson(indent=4) }}", "{{ messages[0]['x'] |tojson( indent = 2 ) }}"} {
		if got := rewriteTojsonIndent(src); !strings.Contains(got, pyJSONName+"(") || strings.Contains(got, "tojson(") {
			t.Errorf("rewriteTojsonIndent(%q) = %q", src, got)
		}
	}
	if _, err := (&Tokenizer{}).ApplyChatTemplateTools([]Message{{Role: "user"}}, []json.RawMessage{json.RawMessage(`{}`)}, true); err == nil {
		t.Error("tools without a chat template: no error")
	}
}
