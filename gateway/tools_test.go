package gateway

import (
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
)

// TestParseToolCalls: Llama 4's JSON tool calls in fixed model outputs, as vLLM's llama3_json parser
// reads them; arguments written as Python's json.dumps.
func TestParseToolCalls(t *testing.T) {
	type call struct{ name, args string }
	for _, tc := range []struct {
		name, text string
		want       []call // nil: not a tool call
	}{
		{"one call", `{"name": "get_weather", "parameters": {"city": "Paris"}}`, []call{{"get_weather", `{"city": "Paris"}`}}},
		{"arguments key, compact JSON", `{"name":"f","arguments":{"a":[1,2.5,{"b":null}],"c":"x\"y"}}`, []call{{"f", `{"a": [1, 2.5, {"b": null}], "c": "x\"y"}`}}},
		{"leading white space, no ascii escaping", "\n  {\"name\": \"f\", \"parameters\": {\"city\": \"Zürich <1>\"}}", []call{{"f", `{"city": "Zürich <1>"}`}}},
		{"two calls with ;", `{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}`, []call{{"a", `{}`}, {"b", `{"x": 1}`}}},
		{"two calls on lines", "{\"name\": \"a\", \"parameters\": {}}\n{\"name\": \"b\", \"parameters\": {}}\n", []call{{"a", `{}`}, {"b", `{}`}}},
		{"key order kept", `{"parameters": {"z": 1, "a": 2}, "name": "f"}`, []call{{"f", `{"z": 1, "a": 2}`}}},
		{"plain text", "The weather is fine.", nil},
		{"text before the call", `Sure: {"name": "f", "parameters": {}}`, nil},
		{"text after the call", `{"name": "f", "parameters": {}} done`, nil},
		{"no name", `{"parameters": {}}`, nil},
		{"no parameters", `{"name": "f"}`, nil},
		{"cut short", `{"name": "f", "parameters": {"city": "Par`, nil},
		{"a JSON answer that is not a call", `{"answer": 42}`, nil},
		{"empty", "", nil},
	} {
		calls, ok := parseToolCalls(tc.text)
		var got []call
		for _, c := range calls {
			got = append(got, call{c.Name, string(c.Arguments)})
		}
		if ok != (tc.want != nil) || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: parseToolCalls(%q) = %v, %v; want %v", tc.name, tc.text, got, ok, tc.want)
		}
	}
}

// TestToolCalls: a chat with tools renders them and the assistant's tool calls (arguments parsed from
// their JSON string) and tool results; the model's call comes back as tool_calls with finish_reason
// tool_calls, whole and streamed; text that is not a call is content, streamed as it comes.
func TestToolCalls(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	tools := `[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]`
	body := `{"messages":[{"role":"user","content":"Paris?"},` +
		`{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Oslo\"}"}}]},` +
		`{"role":"user","content":"and Paris?"}],"tools":` + tools + `,"max_tokens":8}`
	var rendered []int
	f.onGenerate = func(r Request) { rendered = r.PromptIDs }
	f.texts = []string{"{\"name\": \"get_", "weather\", \"parameters\": ", "{\"city\": \"Paris\"}}"}
	code, _, data := call(t, http.MethodPost, base+"/v1/chat/completions", body)
	wantPrompt := "tools: " + tools + "\nuser: Paris?\nassistant: \ncall get_weather {\"city\": \"Oslo\"}\nuser: and Paris?\nassistant: "
	if got, _ := (fakeTok{}).Decode(rendered); got != wantPrompt {
		t.Errorf("rendered prompt = %q, want %q", got, wantPrompt)
	}
	var r ChatResponse
	if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil {
		t.Fatalf("POST = %d %s", code, data)
	}
	m := r.Choices[0].Message
	if m.Content != nil || len(m.ToolCalls) != 1 || m.ToolCalls[0].Function != (ChatToolFunction{"get_weather", `{"city": "Paris"}`}) ||
		m.ToolCalls[0].Type != "function" || !strings.HasPrefix(m.ToolCalls[0].ID, "chatcmpl-tool-") || *r.Choices[0].FinishReason != FinishToolCalls {
		t.Errorf("tool call response = %s", data)
	}

	// Streamed: nothing of the call as content; one delta with the call (index 0), then the finish.
	code, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", strings.Replace(body, "{", `{"stream":true,`, 1))
	var content strings.Builder
	var calls []ChatToolCall
	var finish string
	for _, ev := range gatewaytest.Events(t, data) {
		if ev == "[DONE]" {
			continue
		}
		var c ChatResponse
		if err := json.Unmarshal([]byte(ev), &c); err != nil {
			t.Fatal(err)
		}
		d := c.Choices[0].Delta
		if d.Content != nil {
			content.WriteString(*d.Content)
		}
		calls = append(calls, d.ToolCalls...)
		if fr := c.Choices[0].FinishReason; fr != nil {
			finish = *fr
		}
	}
	if code != http.StatusOK || content.String() != "" || len(calls) != 1 || calls[0].Index == nil || *calls[0].Index != 0 ||
		calls[0].Function.Arguments != `{"city": "Paris"}` || finish != FinishToolCalls {
		t.Errorf("streamed tool call: content %q, calls %+v, finish %q; body %s", content.String(), calls, finish, data)
	}

	// Not a call: text, whole and streamed (the first piece shows it is not one, so nothing is held).
	f.texts = []string{"Sunny", " in Paris."}
	_, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", body)
	r = ChatResponse{}
	if err := json.Unmarshal(data, &r); err != nil || r.Choices[0].Message.Content == nil || *r.Choices[0].Message.Content != "Sunny in Paris." ||
		r.Choices[0].Message.ToolCalls != nil || *r.Choices[0].FinishReason != FinishStop {
		t.Errorf("text answer with tools = %s", data)
	}
	// A held "{" that is not a call is sent as text at the end.
	f.texts = []string{"{not", " a call}"}
	_, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", strings.Replace(body, "{", `{"stream":true,`, 1))
	content.Reset()
	for _, ev := range gatewaytest.Events(t, data) {
		var c ChatResponse
		if ev != "[DONE]" && json.Unmarshal([]byte(ev), &c) == nil && c.Choices[0].Delta.Content != nil {
			content.WriteString(*c.Choices[0].Delta.Content)
		}
	}
	if content.String() != "{not a call}" {
		t.Errorf("streamed held text = %q, want %q", content.String(), "{not a call}")
	}
	// tool_choice none: the tools are rendered, the output is text.
	f.texts = []string{`{"name": "get_weather", "parameters": {}}`}
	_, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", strings.Replace(body, "{", `{"tool_choice":"none",`, 1))
	r = ChatResponse{}
	if err := json.Unmarshal(data, &r); err != nil || r.Choices[0].Message.ToolCalls != nil || *r.Choices[0].FinishReason != FinishStop {
		t.Errorf("tool_choice none = %s, want the call as text", data)
	}
	// Bad arguments in a request's tool call.
	bad := strings.Replace(body, `"{\"city\": \"Oslo\"}"`, `"{city"`, 1)
	if code, _, data := call(t, http.MethodPost, base+"/v1/chat/completions", bad); code != http.StatusBadRequest || !strings.Contains(string(data), "messages[1].tool_calls[0].function.arguments is not JSON") {
		t.Errorf("bad arguments = %d %s", code, data)
	}
}
