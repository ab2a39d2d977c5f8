package coordinator

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// TestStopText: stop strings end the text where vLLM's check_stop_strings ends it, given the text of
// each token in turn; a stream sends, step by step, only text no stop string can still claim, and in
// all exactly the whole response's text.
func TestStopText(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pieces  []string // the text of each token
		stops   []string
		include bool
		want    string // vLLM's output text
		hit     string // the stop string found, "" for none
		tokens  int    // tokens consumed up to and including the one that completed the stop
	}{
		{"no stop", []string{"Hello", " world"}, nil, false, "Hello world", "", 2},
		{"no match", []string{"Hello", " world"}, []string{"xyz"}, false, "Hello world", "", 2},
		{"inside one token", []string{"Hello", " world", "!"}, []string{"wor"}, false, "Hello ", "wor", 2},
		{"inside one token, included", []string{"Hello", " world", "!"}, []string{"wor"}, true, "Hello wor", "wor", 2},
		{"across two tokens", []string{"Hel", "lo", " wo", "rld"}, []string{"o w"}, false, "Hell", "o w", 3},
		{"across three tokens", []string{"a", "b", "c", "d"}, []string{"bcd"}, false, "a", "bcd", 4},
		{"across two tokens, included", []string{"Hel", "lo", " wo", "rld"}, []string{"o w"}, true, "Hello w", "o w", 3},
		{"at the very start", []string{"Hi", " there"}, []string{"Hi"}, false, "", "Hi", 1},
		{"at the very start, across tokens", []string{"H", "i", " there"}, []string{"Hi"}, false, "", "Hi", 2},
		{"the whole first token", []string{"\n", "x"}, []string{"\n"}, false, "", "\n", 1},
		{"several stops, first found wins", []string{"one", " two", " three"}, []string{"three", "two"}, false, "one ", "two", 2},
		// vLLM tries the stops in the request's order: within one token's text the first stop listed
		// wins, even when another starts earlier.
		{"several stops in one token, list order", []string{"x", "ab"}, []string{"b", "a"}, false, "xa", "b", 2},
		{"a prefix that does not complete", []string{"wo", "w", "orld"}, []string{"world"}, false, "wo", "world", 3},
		{"partial then diverges", []string{"wo", "rk", " world"}, []string{"world"}, false, "work ", "world", 3},
		{"multi-byte characters", []string{"é", "✓", "x"}, []string{"✓x"}, false, "é", "✓x", 3},
		{"empty pieces (an unfinished character)", []string{"a", "", "bc"}, []string{"b"}, false, "a", "b", 3},
	} {
		run := func(stream bool) (string, string, int) {
			s := stopText{stops: tc.stops, include: tc.include}
			var out strings.Builder
			n := 0
			for _, p := range tc.pieces {
				n++
				hit := s.add(p)
				if stream || hit {
					got := s.next(hit)
					// What a stream sends must never be taken back: it is a prefix of the answer.
					out.WriteString(got)
					if !strings.HasPrefix(tc.want, out.String()) {
						t.Errorf("%s: streamed %q after %d tokens, not a prefix of %q", tc.name, out.String(), n, tc.want)
					}
				}
				if hit {
					return out.String(), s.hit, n
				}
			}
			out.WriteString(s.next(true))
			return out.String(), s.hit, n
		}
		for _, stream := range []bool{false, true} {
			if got, hit, n := run(stream); got != tc.want || hit != tc.hit || n != tc.tokens {
				t.Errorf("%s (stream %v): stop %q over %q = %q, stop %q after %d tokens; want %q, %q after %d",
					tc.name, stream, tc.stops, tc.pieces, got, hit, n, tc.want, tc.hit, tc.tokens)
			}
		}
	}
}

// TestStopTextHold: a stream holds back only the tail that begins a stop string, and sends it once it
// cannot become one.
func TestStopTextHold(t *testing.T) {
	s := stopText{stops: []string{"END", "\n\n"}}
	for _, step := range []struct{ piece, want string }{
		{"abc", "abc"},
		{"xE", "x"}, // "E" may begin "END"
		{"N", ""},   // "EN" too
		{"Dx", ""},  // the stop: nothing more
	} {
		if hit := s.add(step.piece); hit {
			if got := s.next(true); got != step.want {
				t.Errorf("next(true) after %q = %q, want %q", step.piece, got, step.want)
			}
			break
		}
		if got := s.next(false); got != step.want {
			t.Errorf("next(false) after %q = %q, want %q", step.piece, got, step.want)
		}
	}
	s = stopText{stops: []string{"END"}}
	s.add("aEN")
	s.add("x")
	if got := s.next(false); got != "aENx" {
		t.Errorf("next(false) after \"aEN\", \"x\" = %q, want \"aENx\" (the tail can no longer become a stop)", got)
	}
}

// TestOpenAIStopStrings: stop strings through the gateway, whole and streamed, and through gRPC, on a
// script whose first token is "hello" (one token of five characters) then single bytes: the text is
// what vLLM gives, finish_reason is stop, the ids end with the token that completed the stop string.
func TestOpenAIStopStrings(t *testing.T) {
	dir, tok := modelWithTokenizer(t)
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	hello := tok.Encode("hello", false)
	if len(hello) != 1 {
		t.Fatalf("Encode(hello) = %v, want one token", hello)
	}
	script := []int32{int32(hello[0])}
	for _, b := range []byte(" world, bye") {
		script = append(script, int32(b))
	}
	prompt := tok.Encode("hi", true)
	ws[0].setNext(func(seq []int32) int32 {
		if n := len(seq) - len(prompt); n >= 0 && n < len(script) {
			return script[n]
		}
		return 'z'
	})
	cfg := testConfig(t)
	cfg.Model = dir
	c, cli, base := startGateway(t, cfg)
	waitReady(t, c)

	for _, tc := range []struct {
		name    string
		stop    string // the JSON of the stop field
		include bool
		want    string
		reason  string
		tokens  int
		min     int // min_tokens: stop strings are looked for only after that many tokens
	}{
		{"inside one token", `"ell"`, false, "h", "ell", 1, 0},
		{"across two tokens", `"o w"`, false, "hell", "o w", 3, 0},
		{"across two tokens, included", `["o w"]`, true, "hello w", "o w", 3, 0},
		{"at the very start", `["hel"]`, false, "", "hel", 1, 0},
		{"several stops", `["bye", "rl", "wor"]`, false, "hello ", "wor", 5, 0},
		{"no match", `["xyz"]`, false, "hello world, byezz", "", 14, 0},
		// vLLM looks for stop strings only once more than min_tokens tokens came: "hel", complete
		// after the first token, is never found; "bye" is.
		{"min_tokens", `["hel", "bye"]`, false, "hello world, ", "bye", 12, 1},
	} {
		body := `{"prompt":"hi","max_tokens":14,"temperature":0,"stop":` + tc.stop + fmt.Sprintf(`,"include_stop_str_in_output":%v,"return_token_ids":true,"min_tokens":%d`, tc.include, tc.min)
		finish := FinishStop
		if tc.reason == "" {
			finish = FinishLength
		}
		code, data := post(t, base, "/v1/completions", body+"}")
		res := decode[gateway.CompletionResponse](t, data)
		if code != 200 || len(res.Choices) != 1 || res.Choices[0].Text != tc.want || *res.Choices[0].FinishReason != finish ||
			res.Choices[0].StopReason != tc.reason || len(res.Choices[0].TokenIDs) != tc.tokens || res.Usage.CompletionTokens != tc.tokens {
			t.Errorf("%s: POST /v1/completions %s} = %d %s; want text %q, finish %s, stop_reason %q, %d tokens", tc.name, body, code, data, tc.want, finish, tc.reason, tc.tokens)
		}
		for _, path := range []string{"/v1/completions", "/v1/chat/completions"} {
			req := body + `,"stream":true}`
			if path == "/v1/chat/completions" {
				req = strings.Replace(req, `"prompt":"hi"`, `"messages":[{"role":"user","content":"hi"}]`, 1)
				// The chat prompt differs: the script runs from the chat prompt's end.
				chat, err := tok.EncodeChat([]tokenizer.Message{{Role: "user", Content: "hi"}}, true)
				if err != nil {
					t.Fatal(err)
				}
				ws[0].setNext(func(seq []int32) int32 {
					if n := len(seq) - len(chat); n >= 0 && n < len(script) {
						return script[n]
					}
					return 'z'
				})
			}
			code, _, data := call(t, testCtx(t), "POST", base+path, req)
			var text strings.Builder
			var got, reason string
			ids := 0
			for _, ev := range gatewaytest.Events(t, data) {
				if path == "/v1/chat/completions" {
					ch := decode[gateway.ChatResponse](t, []byte(ev))
					if ch.Choices[0].Delta.Content != nil {
						text.WriteString(*ch.Choices[0].Delta.Content)
					}
					if f := ch.Choices[0].FinishReason; f != nil {
						got, reason = *f, ch.Choices[0].StopReason
					}
					ids += len(ch.Choices[0].TokenIDs)
					continue
				}
				ch := decode[gateway.CompletionResponse](t, []byte(ev))
				text.WriteString(ch.Choices[0].Text)
				if f := ch.Choices[0].FinishReason; f != nil {
					got, reason = *f, ch.Choices[0].StopReason
				}
				ids += len(ch.Choices[0].TokenIDs)
			}
			if code != 200 || text.String() != tc.want || got != finish || reason != tc.reason || ids != tc.tokens {
				t.Errorf("%s: POST %s %s = %d %s; want text %q, finish %s, stop_reason %q, %d tokens", tc.name, path, req, code, data, tc.want, finish, tc.reason, tc.tokens)
			}
		}
		ws[0].setNext(func(seq []int32) int32 {
			if n := len(seq) - len(prompt); n >= 0 && n < len(script) {
				return script[n]
			}
			return 'z'
		})

		// gRPC: the same text, the ids up to the stop.
		var stops []string
		if err := json.Unmarshal([]byte(tc.stop), &stops); err != nil {
			var one string
			_ = json.Unmarshal([]byte(tc.stop), &one)
			stops = []string{one}
		}
		sampling := greedy()
		sampling.MinTokens = tc.min
		g, err := cli.Generate(testCtx(t), client.GenerateRequest{Prompt: "hi", MaxTokens: 14, Sampling: sampling, Stop: stops, IncludeStopStr: tc.include}, nil)
		if err != nil || g.Text != tc.want || g.FinishReason != finish || g.StopReason != tc.reason || len(g.IDs) != tc.tokens {
			t.Errorf("%s: Generate(stop %q) = %+v, %v; want text %q, finish %s, stop reason %q, %d ids", tc.name, stops, g, err, tc.want, finish, tc.reason, tc.tokens)
		}
	}
}
