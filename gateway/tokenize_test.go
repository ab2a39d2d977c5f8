package gateway

import (
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// TestTokenize: /tokenize and /detokenize as vLLM serves them. The fake tokenizer encodes a text as its
// bytes after a BOS of 1, a chat as the bytes of "role: content\n" per message (and "assistant: ").
func TestTokenize(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	for _, tc := range []struct {
		name, path, body string
		want             any
	}{
		{"prompt", "/tokenize", `{"prompt":"hi"}`, TokenizeResponse{Count: 3, MaxModelLen: 64, Tokens: []int{1, 104, 105}}},
		{"prompt without BOS", "/tokenize", `{"model":"fake","prompt":"hi","add_special_tokens":false}`, TokenizeResponse{Count: 2, MaxModelLen: 64, Tokens: []int{104, 105}}},
		{"token strings", "/tokenize", `{"prompt":"a","return_token_strs":true}`,
			TokenizeResponse{Count: 2, MaxModelLen: 64, Tokens: []int{1, 97}, TokenStrs: []string{`"\x01"`, `"a"`}}},
		{"empty prompt", "/tokenize", `{"prompt":"","add_special_tokens":false}`, TokenizeResponse{MaxModelLen: 64, Tokens: []int{}}},
		{"messages", "/tokenize", `{"messages":[{"role":"user","content":"x"}]}`,
			TokenizeResponse{Count: 19, MaxModelLen: 64, Tokens: fakeTok{}.Encode("user: x\nassistant: ", false)}},
		{"messages, no generation prompt", "/tokenize", `{"messages":[{"role":"user","content":"x"}],"add_generation_prompt":false}`,
			TokenizeResponse{Count: 8, MaxModelLen: 64, Tokens: fakeTok{}.Encode("user: x\n", false)}},
		{"detokenize", "/detokenize", `{"tokens":[1,104]}`, DetokenizeResponse{Prompt: "<1><104>"}},
	} {
		code, _, data := call(t, http.MethodPost, base+tc.path, tc.body)
		var got any
		switch tc.want.(type) {
		case TokenizeResponse:
			got = decode[TokenizeResponse](t, data)
		default:
			got = decode[DetokenizeResponse](t, data)
		}
		if code != http.StatusOK || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: POST %s %s = %d %s, want %+v", tc.name, tc.path, tc.body, code, data, tc.want)
		}
	}
	for _, tc := range []struct {
		name, path, body string
		status           int
		msg              string
	}{
		{"both", "/tokenize", `{"prompt":"a","messages":[{"role":"user","content":"x"}]}`, 400, "send prompt or messages, not both or neither"},
		{"neither", "/tokenize", `{}`, 400, "send prompt or messages"},
		{"no role", "/tokenize", `{"messages":[{"content":"x"}]}`, 400, "messages[0]: no role"},
		{"unknown model", "/detokenize", `{"model":"gpt-2","tokens":[1]}`, 404, `unknown model "gpt-2"`},
		{"tokens not ids", "/detokenize", `{"tokens":"ab"}`, 400, "field tokens: want an array"},
		{"GET", "/tokenize", ``, 405, "use POST"},
	} {
		method := http.MethodPost
		if tc.name == "GET" {
			method = http.MethodGet
		}
		code, _, data := call(t, method, base+tc.path, tc.body)
		if body := decode[ErrorBody](t, data); code != tc.status || !strings.Contains(body.Error.Message, tc.msg) {
			t.Errorf("%s: %s %s = %d %s, want %d with %q", tc.name, method, tc.path, code, data, tc.status, tc.msg)
		}
	}
	f.tok = false
	if code, _, data := call(t, http.MethodPost, base+"/tokenize", `{"prompt":"a"}`); code != http.StatusBadRequest || !strings.Contains(string(data), "no_tokenizer") {
		t.Errorf("POST /tokenize without a tokenizer = %d %s, want 400 no_tokenizer", code, data)
	}
}
