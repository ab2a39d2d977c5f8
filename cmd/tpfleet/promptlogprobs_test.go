package main

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// echoLogprobs is a text_completion choice's logprobs as the client reads them.
type echoLogprobs struct {
	TextOffset    []int                `json:"text_offset"`
	TokenLogprobs []*float64           `json:"token_logprobs"`
	Tokens        []string             `json:"tokens"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
}

// scoreChatFixture returns the log-softmax (float64) of the chat fixture's teacher-forced logits of ids,
// run on the CPU in this process: row i scores the token after ids[:i+1].
func scoreChatFixture(t *testing.T, ids []int) [][]float64 {
	t.Helper()
	cfg, err := llama4.LoadConfig(chatFixture)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(chatFixture)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	ops := cpu.New(cpu.Config{})
	m, err := llama4.Load(context.Background(), ops, cfg, llama4.NewCheckpointWeights(ckpt, ops, cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	logits, err := m.Score(context.Background(), ids)
	if err != nil {
		t.Fatal(err)
	}
	vocab := cfg.VocabSize
	out := make([][]float64, len(ids))
	for i := range out {
		row := logits[i*vocab : (i+1)*vocab]
		mx := math.Inf(-1)
		for _, x := range row {
			mx = max(mx, float64(x))
		}
		sum := 0.0
		for _, x := range row {
			sum += math.Exp(float64(x) - mx)
		}
		out[i] = make([]float64, vocab)
		for j, x := range row {
			out[i][j] = float64(x) - mx - math.Log(sum)
		}
	}
	return out
}

// TestEchoLogprobs: `tpfleet serve` (TP=2, the prompt prefilled in pieces of 3 tokens) answers
// /v1/completions with echo and logprobs as vLLM does: the prompt's tokens first (BOS with null
// logprob and top_logprobs), then the generated ones, text_offset counting from the echoed prompt's
// start; every logprob is the CPU model's log-softmax of the teacher-forced logits (1e-4). Streamed,
// the events' logprobs put together are the whole response's, the first event carrying the prompt's.
func TestEchoLogprobs(t *testing.T) {
	base := serveChat(t, "--prefill-chunk", "3")
	tok, err := tokenizer.Load(chatFixture)
	if err != nil {
		t.Fatal(err)
	}
	const prompt, maxTokens, top = "Hello there, you!", 4, 2
	ids := tok.Encode(prompt, true)
	body := `{"prompt":"Hello there, you!","max_tokens":4,"temperature":0,"ignore_eos":true,"logprobs":2,"echo":true,"return_token_ids":true}`

	type choice struct {
		Text     string        `json:"text"`
		Logprobs *echoLogprobs `json:"logprobs"`
		TokenIDs []int         `json:"token_ids"`
	}
	var whole struct {
		Choices []choice `json:"choices"`
	}
	code, data := httpPost(t, base+"/v1/completions", body)
	if err := json.Unmarshal(data, &whole); code != http.StatusOK || err != nil || len(whole.Choices) != 1 || whole.Choices[0].Logprobs == nil {
		t.Fatalf("POST /v1/completions %s = %d %s", body, code, data)
	}
	c := whole.Choices[0]
	lp := c.Logprobs
	if len(c.TokenIDs) != maxTokens {
		t.Fatalf("token_ids %v, want %d", c.TokenIDs, maxTokens)
	}
	all := append(append([]int(nil), ids...), c.TokenIDs...)
	n := len(all)
	if len(lp.Tokens) != n || len(lp.TokenLogprobs) != n || len(lp.TextOffset) != n || len(lp.TopLogprobs) != n {
		t.Fatalf("logprobs of %d tokens (%d, %d, %d), want %d (the prompt's %d, then %d): %s",
			len(lp.Tokens), len(lp.TokenLogprobs), len(lp.TextOffset), len(lp.TopLogprobs), n, len(ids), maxTokens, data)
	}
	gen, err := tok.Decode(c.TokenIDs, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Text != prompt+gen {
		t.Errorf("text %q, want the prompt then the generated text %q", c.Text, prompt+gen)
	}
	if lp.TokenLogprobs[0] != nil || lp.TopLogprobs[0] != nil {
		t.Errorf("first prompt token: logprob %v, top %v; want null, null", lp.TokenLogprobs[0], lp.TopLogprobs[0])
	}
	ref := scoreChatFixture(t, all)
	offset, worst := 0, 0.0
	for i, id := range all {
		text, err := tok.Decode([]int{id}, false)
		if err != nil {
			t.Fatal(err)
		}
		if lp.Tokens[i] != text || lp.TextOffset[i] != offset {
			t.Errorf("token %d: %q at offset %d, want %q at %d", i, lp.Tokens[i], lp.TextOffset[i], text, offset)
		}
		offset += utf8.RuneCountInString(text)
		if i == 0 {
			continue
		}
		want := ref[i-1]
		if lp.TokenLogprobs[i] == nil {
			t.Fatalf("token %d (%q): null logprob", i, text)
		}
		worst = max(worst, math.Abs(*lp.TokenLogprobs[i]-want[id]))
		// The token and the top most likely, keyed by text: tokens of the same text (pieces of one
		// character, "\ufffd") keep the first, as a Python dict does.
		if got, ok := lp.TopLogprobs[i][text]; !ok || len(lp.TopLogprobs[i]) > top+1 || got != *lp.TokenLogprobs[i] {
			t.Errorf("token %d (%q): top_logprobs %v, want it and the %d most likely", i, text, lp.TopLogprobs[i], top)
		}
		best := topIDs(want, top)
		for k, v := range lp.TopLogprobs[i] {
			found := k == text
			for _, j := range best {
				jt, _ := tok.Decode([]int{j}, false)
				found = found || (jt == k && math.Abs(v-want[j]) <= 1e-4)
			}
			if !found {
				t.Errorf("token %d (%q): top entry %q %g is neither the token nor one of the %d most likely", i, text, k, v, top)
			}
		}
	}
	t.Logf("%d prompt + %d generated tokens: max |logprob - CPU log-softmax| %.3g", len(ids), maxTokens, worst)
	if worst > 1e-4 {
		t.Errorf("max |logprob - CPU log-softmax| = %.3g, want <= 1e-4", worst)
	}

	// vLLM's prompt_logprobs on chat: the rendered prompt's tokens with their rank among the CPU
	// model's log-probabilities (the tokens at least as likely).
	code, data = httpPost(t, base+"/v1/chat/completions", `{"messages":[{"role":"user","content":"Hi!"}],"max_tokens":1,"prompt_logprobs":1}`)
	var chat struct {
		PromptLogprobs []map[string]struct {
			Logprob float64 `json:"logprob"`
			Rank    int     `json:"rank"`
		} `json:"prompt_logprobs"`
	}
	if err := json.Unmarshal(data, &chat); code != http.StatusOK || err != nil || len(chat.PromptLogprobs) < 2 || chat.PromptLogprobs[0] != nil {
		t.Fatalf("chat with prompt_logprobs = %d %s", code, data)
	}
	chatIDs, err := tok.EncodeChat([]tokenizer.Message{{Role: "user", Content: "Hi!"}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(chat.PromptLogprobs) != len(chatIDs) {
		t.Fatalf("chat prompt_logprobs has %d entries, want the prompt's %d", len(chat.PromptLogprobs), len(chatIDs))
	}
	chatRef := scoreChatFixture(t, chatIDs)
	for i := 1; i < len(chatIDs); i++ {
		id, want := chatIDs[i], chatRef[i-1]
		got, ok := chat.PromptLogprobs[i][strconv.Itoa(id)]
		rank := 0
		for _, v := range want {
			if v >= want[id] {
				rank++
			}
		}
		if !ok || math.Abs(got.Logprob-want[id]) > 1e-4 || got.Rank != rank {
			t.Errorf("chat prompt_logprobs[%d] = %v, want id %d with %g, rank %d", i, chat.PromptLogprobs[i], id, want[id], rank)
		}
	}

	// Streamed: the first event has the echoed prompt and its logprobs with the first token's.
	code, data = httpPost(t, base+"/v1/completions", strings.Replace(body, "{", `{"stream":true,`, 1))
	if code != http.StatusOK {
		t.Fatalf("POST stream = %d %s", code, data)
	}
	var joined echoLogprobs
	var text strings.Builder
	events := 0
	for _, ev := range gatewaytest.Events(t, data) {
		if ev == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []choice `json:"choices"`
		}
		if err := json.Unmarshal([]byte(ev), &chunk); err != nil || len(chunk.Choices) != 1 {
			t.Fatalf("event %s: %v", ev, err)
		}
		ch := chunk.Choices[0]
		text.WriteString(ch.Text)
		if ch.Logprobs == nil {
			continue
		}
		if events++; events == 1 && (len(ch.Logprobs.Tokens) != len(ids)+1 || !strings.HasPrefix(ch.Text, prompt)) {
			t.Errorf("first event: text %q with %d logprob tokens, want the prompt's text and %d tokens", ch.Text, len(ch.Logprobs.Tokens), len(ids)+1)
		}
		joined.TextOffset = append(joined.TextOffset, ch.Logprobs.TextOffset...)
		joined.TokenLogprobs = append(joined.TokenLogprobs, ch.Logprobs.TokenLogprobs...)
		joined.Tokens = append(joined.Tokens, ch.Logprobs.Tokens...)
		joined.TopLogprobs = append(joined.TopLogprobs, ch.Logprobs.TopLogprobs...)
	}
	if text.String() != c.Text || !reflect.DeepEqual(joined, *lp) {
		t.Errorf("streamed: text %q, logprobs %+v\nwant the whole response's %q, %+v", text.String(), joined, c.Text, *lp)
	}
}

// topIDs returns the ids of the n highest log-probabilities, highest first (ties by lower id).
func topIDs(lps []float64, n int) []int {
	idx := make([]int, len(lps))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return lps[idx[a]] > lps[idx[b]] })
	return idx[:n]
}

// httpPost posts a JSON body and returns the status and the response body.
func httpPost(t *testing.T, url, body string) (int, []byte) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}
