package gateway

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzRequestBody posts bodies (outside input: anyone who can reach the gateway) to the completion and
// chat routes: every one gets a response — 200, or an OpenAI error body with a 4xx status — never a
// panic or a 500 from the gateway's own code. Its seeds run in go test.
func FuzzRequestBody(f *testing.F) {
	for _, s := range []string{
		`{"model":"fake","prompt":"hi","max_tokens":3}`,
		`{"prompt":[1,2,3],"max_tokens":2,"temperature":0}`,
		`{"prompt":[[1,2]],"max_tokens":1}`,
		`{"prompt":"x","max_tokens":2,"stream":true,"stream_options":{"include_usage":true}}`,
		`{"prompt":"x","stop":["a","b"],"logprobs":2,"n":2}`,
		`{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}`,
		`{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":1}`,
		`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`,
		`{"messages":[],"max_tokens":1,"response_format":{"type":"json_object"}}`,
		`{"prompt":"x","max_tokens":-1}`, `{"prompt":"x","max_tokens":1e30}`, `{"prompt":[99999999999]}`,
		`{"prompt":"x","top_p":2,"top_k":-5,"seed":-1}`, `{}`, `[]`, `null`, `{"prompt":`, "\xff",
	} {
		f.Add(strings.Contains(s, "messages"), []byte(s))
	}
	g, err := New(Config{Generator: &fakeGen{tok: true}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, chat bool, body []byte) {
		path := "/v1/completions"
		if chat {
			path = "/v1/chat/completions"
		}
		req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(string(body)))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		g.ServeHTTP(rec, req)
		code, out := rec.Code, rec.Body.Bytes()
		switch {
		case code == http.StatusOK:
			if strings.HasPrefix(rec.Header().Get("Content-Type"), "text/event-stream") {
				if !strings.HasSuffix(string(out), "data: [DONE]\n\n") {
					t.Fatalf("POST %s %q: stream %q does not end with [DONE]", path, body, out)
				}
				return
			}
			if !json.Valid(out) {
				t.Fatalf("POST %s %q = 200 with invalid JSON %q", path, body, out)
			}
		case code >= 400 && code < 500:
			var e struct {
				Error struct {
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(out, &e); err != nil || e.Error.Message == "" {
				t.Fatalf("POST %s %q = %d with %q, want an OpenAI error body", path, body, code, out)
			}
		default:
			t.Fatalf("POST %s %q = %d %q, want 200 or 4xx", path, body, code, out)
		}
	})
}
