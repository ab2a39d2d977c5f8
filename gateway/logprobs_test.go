package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
)

// TestSamplingControls: the penalties, min_tokens, logit_bias (clamped to [-100, 100]) and logprobs
// reach the Generator.
func TestSamplingControls(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	body := `{"prompt":[1],"max_tokens":2,"presence_penalty":0.5,"frequency_penalty":-0.25,"repetition_penalty":1.3,
		"min_tokens":2,"logit_bias":{"7":250,"9":-3.5},"logprobs":4}`
	if code, _, data := call(t, http.MethodPost, base+"/v1/completions", body); code != http.StatusOK {
		t.Fatalf("POST /v1/completions = %d %s", code, data)
	}
	f.mu.Lock()
	got := f.last
	f.mu.Unlock()
	want := Sampling{MinTokens: 2, LogitBias: map[int]float64{7: 100, 9: -3.5}, RepetitionPenalty: 1.3, FrequencyPenalty: -0.25, PresencePenalty: 0.5}
	if !reflect.DeepEqual(got.Sampling, want) || !got.Logprobs || got.TopLogprobs != 4 {
		t.Errorf("Generator got sampling %+v, logprobs %v top %d; want %+v, true, 4", got.Sampling, got.Logprobs, got.TopLogprobs, want)
	}
}

// TestLogprobFormats: completions and chat logprobs, whole and streamed, as vLLM writes them. The fake
// gives the chosen id k the logprob -k/100 and its top ones k+1, k+2, … -0.5, -1, …; its tokens are
// "<k>".
func TestLogprobFormats(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	// Prompt [1]: ids 2 and 3.
	wantCompletion := `{"text_offset":[0,3],"token_logprobs":[-0.02,-0.03],"tokens":["<2>","<3>"],` +
		`"top_logprobs":[{"<2>":-0.02,"<3>":-0.5,"<4>":-1},{"<3>":-0.03,"<4>":-0.5,"<5>":-1}]}`
	// The chat prompt ends with "assistant: ": ids 33 and 34.
	wantChat := `{"content":[` +
		`{"token":"<33>","logprob":-0.33,"bytes":[60,51,51,62],"top_logprobs":[{"token":"<33>","logprob":-0.33,"bytes":[60,51,51,62]},{"token":"<34>","logprob":-0.5,"bytes":[60,51,52,62]}]},` +
		`{"token":"<34>","logprob":-0.34,"bytes":[60,51,52,62],"top_logprobs":[{"token":"<34>","logprob":-0.34,"bytes":[60,51,52,62]},{"token":"<35>","logprob":-0.5,"bytes":[60,51,53,62]}]}]}`
	compact := func(s string) string {
		var v any
		if err := json.Unmarshal([]byte(s), &v); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		b, _ := json.Marshal(v)
		return string(b)
	}
	for _, tc := range []struct {
		name, path, body, want string
	}{
		{"completions", "/v1/completions", `{"prompt":[1],"max_tokens":2,"logprobs":2}`, wantCompletion},
		{"chat", "/v1/chat/completions", `{"messages":[{"role":"user","content":"\u0001"}],"max_tokens":2,"logprobs":true,"top_logprobs":2}`, wantChat},
	} {
		code, _, data := call(t, http.MethodPost, base+tc.path, tc.body)
		var r struct {
			Choices []struct {
				Logprobs json.RawMessage `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil || len(r.Choices) != 1 {
			t.Fatalf("%s: POST = %d %s", tc.name, code, data)
		}
		if got := compact(string(r.Choices[0].Logprobs)); got != compact(tc.want) {
			t.Errorf("%s: logprobs = %s\nwant %s", tc.name, got, tc.want)
		}
		// Streamed: one event per token, with that token's logprobs; offsets go on from the last event.
		code, _, data = call(t, http.MethodPost, base+tc.path, strings.Replace(tc.body, "{", `{"stream":true,`, 1))
		var parts []string
		for _, ev := range gatewaytest.Events(t, data) {
			if ev == "[DONE]" {
				continue
			}
			if err := json.Unmarshal([]byte(ev), &r); err != nil {
				t.Fatalf("%s: event %s: %v", tc.name, ev, err)
			}
			if lp := r.Choices[0].Logprobs; len(lp) > 0 && string(lp) != "null" {
				parts = append(parts, compact(string(lp)))
			}
		}
		var want []string
		if tc.path == "/v1/completions" {
			want = []string{
				compact(`{"text_offset":[0],"token_logprobs":[-0.02],"tokens":["<2>"],"top_logprobs":[{"<2>":-0.02,"<3>":-0.5,"<4>":-1}]}`),
				compact(`{"text_offset":[3],"token_logprobs":[-0.03],"tokens":["<3>"],"top_logprobs":[{"<3>":-0.03,"<4>":-0.5,"<5>":-1}]}`),
			}
		} else {
			var whole ChatLogprobs
			_ = json.Unmarshal([]byte(wantChat), &whole)
			for _, c := range whole.Content {
				b, _ := json.Marshal(ChatLogprobs{Content: []ChatTokenLogprob{c}})
				want = append(want, compact(string(b)))
			}
		}
		if code != http.StatusOK || !reflect.DeepEqual(parts, want) {
			t.Errorf("%s streamed: %d, logprobs %v\nwant %v", tc.name, code, parts, want)
		}
	}
	// Without logprobs asked for, the field is null.
	_, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[1],"max_tokens":1}`)
	if !strings.Contains(string(data), `"logprobs":null`) {
		t.Errorf("completion without logprobs = %s, want logprobs null", data)
	}
}

// TestEchoLogprobs: /v1/completions with echo and logprobs asks the Generator for the prompt's
// logprobs and writes the prompt's tokens first, as vLLM does: the first with null logprob and top,
// text_offset from the echoed prompt's start; streamed, the first event carries the prompt's with the
// first token's (and the echoed text), the next ones go on from its offsets.
func TestEchoLogprobs(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	// Prompt "hi" is [1 104 105] ("<1>", "<104>", "<105>" as logprob tokens); it generates 106, 107.
	want := `{"text_offset":[0,3,8,13,18],"token_logprobs":[null,-0.1,-0.2,-1.06,-1.07],` +
		`"tokens":["<1>","<104>","<105>","<106>","<107>"],` +
		`"top_logprobs":[null,{"<104>":-0.1,"<105>":-0.25},{"<105>":-0.2,"<106>":-0.25},{"<106>":-1.06,"<107>":-0.5},{"<107>":-1.07,"<108>":-0.5}]}`
	wantEvents := []string{
		`{"text_offset":[0,3,8,13],"token_logprobs":[null,-0.1,-0.2,-1.06],"tokens":["<1>","<104>","<105>","<106>"],` +
			`"top_logprobs":[null,{"<104>":-0.1,"<105>":-0.25},{"<105>":-0.2,"<106>":-0.25},{"<106>":-1.06,"<107>":-0.5}]}`,
		`{"text_offset":[18],"token_logprobs":[-1.07],"tokens":["<107>"],"top_logprobs":[{"<107>":-1.07,"<108>":-0.5}]}`,
	}
	type choice struct {
		Text     string          `json:"text"`
		Logprobs json.RawMessage `json:"logprobs"`
	}
	var r struct {
		Choices []choice `json:"choices"`
	}
	for _, prompt := range []string{`"hi"`, `[1,104,105]`} {
		body := `{"prompt":` + prompt + `,"max_tokens":2,"logprobs":1,"echo":true}`
		code, _, data := call(t, http.MethodPost, base+"/v1/completions", body)
		if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil || len(r.Choices) != 1 {
			t.Fatalf("POST %s = %d %s", body, code, data)
		}
		f.mu.Lock()
		asked := f.last.PromptLogprobs
		f.mu.Unlock()
		if asked == nil || *asked != 1 {
			t.Errorf("%s: Generator asked for prompt logprobs %v, want 1", body, asked)
		}
		if got := r.Choices[0]; got.Text != "hi<106><107>" || string(got.Logprobs) != want {
			t.Errorf("%s: text %q logprobs %s\nwant %q %s", body, got.Text, got.Logprobs, "hi<106><107>", want)
		}
		// As vLLM, the whole choice has the prompt's logprobs in prompt_logprobs's format too.
		if want := `"prompt_logprobs":[null,{"104":{"logprob":-0.1,"rank":1,"decoded_token":"<104>"},`; !strings.Contains(string(data), want) {
			t.Errorf("%s: %s\nwant it to hold %s", body, data, want)
		}
		code, _, data = call(t, http.MethodPost, base+"/v1/completions", strings.Replace(body, "{", `{"stream":true,`, 1))
		var texts, events []string
		for _, ev := range gatewaytest.Events(t, data) {
			if ev == "[DONE]" {
				continue
			}
			if err := json.Unmarshal([]byte(ev), &r); err != nil || len(r.Choices) != 1 {
				t.Fatalf("%s streamed: event %s: %v", body, ev, err)
			}
			texts, events = append(texts, r.Choices[0].Text), append(events, string(r.Choices[0].Logprobs))
		}
		if code != http.StatusOK || !reflect.DeepEqual(texts, []string{"hi<106>", "<107>"}) || !reflect.DeepEqual(events, wantEvents) ||
			strings.Contains(string(data), "prompt_logprobs") {
			t.Errorf("%s streamed: %d texts %q logprobs\n%s\nwant %q\n%s", body, code, texts, strings.Join(events, "\n"), []string{"hi<106>", "<107>"}, strings.Join(wantEvents, "\n"))
		}
	}
	// Echo without logprobs, or logprobs without echo, asks for no prompt logprobs.
	for _, body := range []string{`{"prompt":"hi","max_tokens":1,"echo":true}`, `{"prompt":"hi","max_tokens":1,"logprobs":1}`} {
		if code, _, data := call(t, http.MethodPost, base+"/v1/completions", body); code != http.StatusOK {
			t.Fatalf("POST %s = %d %s", body, code, data)
		}
		f.mu.Lock()
		asked := f.last.PromptLogprobs
		f.mu.Unlock()
		if asked != nil {
			t.Errorf("%s: Generator asked for prompt logprobs %d, want none", body, *asked)
		}
	}
}

// TestPromptLogprobsField: vLLM's prompt_logprobs extra parameter, on completions (per choice) and chat
// (the response's), in vLLM's format: null for the first prompt token, then an object of token ids to
// logprob, rank and decoded_token, the prompt token first and then the N most likely. A stream does not
// write them (nor asks for them), as vLLM's; a count past 20 is refused.
func TestPromptLogprobsField(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	wantCompletion := `[null,` +
		`{"104":{"logprob":-0.1,"rank":1,"decoded_token":"<104>"},"105":{"logprob":-0.25,"rank":1,"decoded_token":"<105>"}},` +
		`{"105":{"logprob":-0.2,"rank":2,"decoded_token":"<105>"},"106":{"logprob":-0.25,"rank":1,"decoded_token":"<106>"}}]`
	code, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":"hi","max_tokens":1,"prompt_logprobs":1}`)
	var r struct {
		Choices []struct {
			PromptLogprobs json.RawMessage `json:"prompt_logprobs"`
			Logprobs       json.RawMessage `json:"logprobs"`
		} `json:"choices"`
		PromptLogprobs json.RawMessage `json:"prompt_logprobs"`
	}
	if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil || len(r.Choices) != 1 {
		t.Fatalf("POST /v1/completions = %d %s", code, data)
	}
	if got := string(r.Choices[0].PromptLogprobs); got != wantCompletion || string(r.Choices[0].Logprobs) != "null" {
		t.Errorf("completion prompt_logprobs = %s, logprobs %s\nwant %s, null", got, r.Choices[0].Logprobs, wantCompletion)
	}
	// Chat: the rendered prompt's, at the response's top level; ranks and tops as above.
	code, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"prompt_logprobs":0}`)
	r.PromptLogprobs = nil
	var entries []map[string]struct {
		Logprob      float32 `json:"logprob"`
		Rank         int     `json:"rank"`
		DecodedToken string  `json:"decoded_token"`
	}
	if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil || json.Unmarshal(r.PromptLogprobs, &entries) != nil {
		t.Fatalf("POST /v1/chat/completions = %d %s", code, data)
	}
	prompt, _ := fakeTok{}.EncodeChat([]Message{{Role: "user", Content: "hi"}}, nil, true)
	if len(entries) != len(prompt) || entries[0] != nil {
		t.Fatalf("chat prompt_logprobs has %d entries (first %v), want %d, the first null: %s", len(entries), entries[0], len(prompt), r.PromptLogprobs)
	}
	for i := 1; i < len(prompt); i++ {
		e, ok := entries[i][strconv.Itoa(prompt[i])]
		if len(entries[i]) != 1 || !ok || e.Rank != i || e.Logprob != -float32(i)/10 || e.DecodedToken != fmt.Sprintf("<%d>", prompt[i]) {
			t.Errorf("chat prompt_logprobs[%d] = %v, want the prompt token %d alone, rank %d", i, entries[i], prompt[i], i)
		}
	}
	// Streamed: not written, nor asked for; top ones are refused, as vLLM refuses them.
	code, _, data = call(t, http.MethodPost, base+"/v1/completions", `{"prompt":"hi","max_tokens":1,"prompt_logprobs":0,"stream":true}`)
	f.mu.Lock()
	asked := f.last.PromptLogprobs
	f.mu.Unlock()
	if code != http.StatusOK || strings.Contains(string(data), "prompt_logprobs") || asked != nil {
		t.Errorf("streamed prompt_logprobs 0: %d %s, Generator asked %v; want none", code, data, asked)
	}
	if code, _, data := call(t, http.MethodPost, base+"/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"prompt_logprobs":1,"stream":true}`); code != http.StatusBadRequest ||
		!strings.Contains(string(data), "not available when stream is true") {
		t.Errorf("streamed prompt_logprobs 1 = %d %s, want 400", code, data)
	}
	if code, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":"hi","prompt_logprobs":21}`); code != http.StatusBadRequest ||
		!strings.Contains(string(data), "prompt_logprobs 21 must be in [0, 20]") {
		t.Errorf("prompt_logprobs 21 = %d %s, want 400 naming it", code, data)
	}
}

// TestTopLogprobMap: a token already in the map is left out, as a Python dict keeps the first; the
// order is kept and HTML is not escaped.
func TestTopLogprobMap(t *testing.T) {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false) // as writeJSON and the event stream write
	err := enc.Encode(TopLogprobMap{{"<b>", -1}, {"a", -2}, {"<b>", -3}})
	if want := `{"<b>":-1,"a":-2}` + "\n"; err != nil || b.String() != want {
		t.Errorf("Encode = %s, %v; want %s", b.String(), err, want)
	}
}
