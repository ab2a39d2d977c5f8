package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/gateway"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// TestSamplingControls: the penalties, bias and min_tokens reach rank 0 as the request set them, with
// the ids min_tokens holds back (the eos ids unless ignored, and the stop ids); logprobs come back one
// per id, through gRPC and the gateway.
func TestSamplingControls(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	c, cli, base := startGateway(t, testConfig(t))
	waitReady(t, c)
	eos := c.model.gen.EOS
	for _, tc := range []struct {
		name     string
		sampling *pb.SamplingParams
		ignore   bool
		stopIDs  []int32
		wantStop []int32
	}{
		{"penalties and bias", &pb.SamplingParams{RepetitionPenalty: 1.2, FrequencyPenalty: 0.5, PresencePenalty: -1, LogitBias: map[int32]float64{7: -100}}, false, nil, nil},
		{"min tokens: eos and stop ids", &pb.SamplingParams{MinTokens: 2}, false, []int32{9, 400}, append(ids32(eos), 9, 400)},
		{"min tokens, eos ignored", &pb.SamplingParams{MinTokens: 2}, true, []int32{400}, []int32{400}},
		{"logprobs", &pb.SamplingParams{Logprobs: true, TopLogprobs: 3}, false, nil, nil},
	} {
		in := &pb.GenerateRequest{PromptIds: []int32{40}, MaxTokens: 3, Sampling: tc.sampling, IgnoreEos: tc.ignore, StopIds: tc.stopIDs}
		stream, err := cli.gen.Generate(testCtx(t), in)
		if err != nil {
			t.Fatal(err)
		}
		var ids []int32
		var lps []*pb.ChosenLogprobs
		for {
			msg, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: Recv: %v", tc.name, err)
			}
			ids, lps = append(ids, msg.GetIds()...), append(lps, msg.GetLogprobs()...)
		}
		if !slices.Equal(ids, []int32{41, 42, 43}) {
			t.Errorf("%s: ids %v, want [41 42 43]", tc.name, ids)
		}
		if tc.sampling.GetLogprobs() {
			if len(lps) != len(ids) || lps[0].GetLogprob() != -0.125 || len(lps[0].GetTop()) != 3 || lps[0].GetTop()[0].GetId() != 41 {
				t.Errorf("%s: logprobs %v, want one per id, each with its 3 top ones", tc.name, lps)
			}
		} else if len(lps) != 0 {
			t.Errorf("%s: logprobs %v, want none", tc.name, lps)
		}
		// The last start the rank 0 fake saw carries the request's sampling.
		var got *pb.SamplingParams
		for _, req := range ws[0].recorded() {
			for _, w := range req.GetSeqs() {
				if w.GetStart() {
					got = w.GetSampling()
				}
			}
		}
		want := proto2(tc.sampling)
		want.MinTokensStopIds = tc.wantStop
		slices.Sort(want.MinTokensStopIds)
		if !reflect.DeepEqual(got.GetMinTokensStopIds(), want.GetMinTokensStopIds()) || !reflect.DeepEqual(got.GetLogitBias(), want.GetLogitBias()) ||
			got.GetRepetitionPenalty() != want.GetRepetitionPenalty() || got.GetFrequencyPenalty() != want.GetFrequencyPenalty() ||
			got.GetPresencePenalty() != want.GetPresencePenalty() || got.GetMinTokens() != want.GetMinTokens() || got.GetTopLogprobs() != want.GetTopLogprobs() {
			t.Errorf("%s: rank 0 got sampling %v, want %v", tc.name, got, want)
		}
	}

	// The Go client gives them one per id.
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{40}, MaxTokens: 2,
		Sampling: &sample.Params{Logprobs: true, TopLogprobs: 2, FrequencyPenalty: 0.5}}, nil)
	if err != nil || len(res.Logprobs) != 2 || res.Logprobs[1].ID != 42 || res.Logprobs[1].Logprob != -0.125 || len(res.Logprobs[1].Top) != 2 {
		t.Errorf("client Generate with logprobs = %+v, %v; want 2 logprobs, each with 2 top ones", res, err)
	}

	// The gateway writes the logprobs, the coordinator's own and one over a Proxy (the gateway
	// process); without a tokenizer a token is "token_id:N".
	_, proxied := startProxyGateway(t, c.Addr())
	for _, url := range []string{base, proxied} {
		code, data := post(t, url, "/v1/completions", `{"prompt":[40],"max_tokens":2,"logprobs":1}`)
		var r struct {
			Choices []struct {
				Logprobs *struct {
					Tokens        []string             `json:"tokens"`
					TokenLogprobs []float32            `json:"token_logprobs"`
					TopLogprobs   []map[string]float32 `json:"top_logprobs"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(data, &r); code != http.StatusOK || err != nil || len(r.Choices) != 1 {
			t.Fatalf("POST %s/v1/completions = %d %s", url, code, data)
		}
		lp := r.Choices[0].Logprobs
		if lp == nil || !slices.Equal(lp.Tokens, []string{"token_id:41", "token_id:42"}) || !slices.Equal(lp.TokenLogprobs, []float32{-0.125, -0.125}) ||
			len(lp.TopLogprobs) != 2 || len(lp.TopLogprobs[0]) != 1 {
			t.Errorf("%s: completion logprobs = %+v", url, lp)
		}
	}
}

// TestPromptLogprobs: prompt_logprobs reach the workers with the sequence's start and come back on
// the first message (gRPC) or chunk (the gateway's echo with logprobs, the coordinator's own and over a
// Proxy); a request that does not ask gets none, and a bad count is refused.
func TestPromptLogprobs(t *testing.T) {
	dir, _ := modelWithTokenizer(t) // echo of a prompt of ids decodes it
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	cfg := testConfig(t)
	cfg.Model = dir
	c, cli, base := startGateway(t, cfg)
	waitReady(t, c)
	two := int32(2)
	stream, err := cli.gen.Generate(testCtx(t), &pb.GenerateRequest{PromptIds: []int32{40, 50, 60}, MaxTokens: 2, PromptLogprobs: &two})
	if err != nil {
		t.Fatal(err)
	}
	var got [][]float32
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		var lps []float32
		for _, lp := range msg.GetPromptLogprobs() {
			lps = append(lps, lp.GetLogprob())
		}
		got = append(got, lps)
	}
	if len(got) != 2 || !slices.Equal(got[0], []float32{-0.25, -0.5}) || got[1] != nil {
		t.Errorf("prompt logprobs per message = %v, want [[-0.25 -0.5] []]", got)
	}
	// The Go client gives them with the prompt's ids.
	one := 1
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{40, 50, 60}, MaxTokens: 1, PromptLogprobs: &one}, nil)
	if err != nil || len(res.PromptLogprobs) != 2 || res.PromptLogprobs[0].ID != 50 || res.PromptLogprobs[1].ID != 60 || res.PromptLogprobs[1].Logprob != -0.5 {
		t.Errorf("client Generate with prompt logprobs = %+v, %v; want ids 50 and 60 with -0.25 and -0.5", res.PromptLogprobs, err)
	}
	bad := int32(21)
	st, err := cli.gen.Generate(testCtx(t), &pb.GenerateRequest{PromptIds: []int32{40}, MaxTokens: 1, PromptLogprobs: &bad})
	if err == nil {
		_, err = st.Recv()
	}
	if err == nil || !strings.Contains(err.Error(), "prompt_logprobs 21 must be in [0, 20]") {
		t.Errorf("prompt_logprobs 21: %v, want INVALID_ARGUMENT naming it", err)
	}
	p, err := NewProxy(ProxyConfig{Coordinators: []string{c.Addr()}, Model: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	g, err := gateway.New(gateway.Config{Generator: p})
	if err != nil {
		t.Fatal(err)
	}
	proxied := httptest.NewServer(g)
	t.Cleanup(proxied.Close)
	for _, url := range []string{base, proxied.URL} {
		for _, stream := range []bool{false, true} {
			body := fmt.Sprintf(`{"prompt":[40,50,60],"max_tokens":2,"logprobs":0,"echo":true,"stream":%v}`, stream)
			code, data := post(t, url, "/v1/completions", body)
			want := `"token_logprobs":[null,-0.25,-0.5,-0.125`
			if code != http.StatusOK || !strings.Contains(string(data), want) {
				t.Errorf("POST %s/v1/completions %s = %d %s, want %s", url, body, code, data, want)
			}
		}
	}
}

// proto2 returns a copy of sp's fields that the tests compare.
func proto2(sp *pb.SamplingParams) *pb.SamplingParams {
	return &pb.SamplingParams{MinTokens: sp.GetMinTokens(), LogitBias: sp.GetLogitBias(), RepetitionPenalty: sp.GetRepetitionPenalty(),
		FrequencyPenalty: sp.GetFrequencyPenalty(), PresencePenalty: sp.GetPresencePenalty(), Logprobs: sp.GetLogprobs(), TopLogprobs: sp.GetTopLogprobs()}
}

func ids32(ids []int) []int32 {
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out
}

// TestGenerationConfig: --generation-config as vLLM's: auto keeps the checkpoint's
// generation_config.json, vllm samples at temperature 1, a directory's file replaces it; anything else
// is refused.
func TestGenerationConfig(t *testing.T) {
	m, err := loadModelInfo(fixture)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"do_sample": true, "temperature": 0.3, "top_k": 5, "eos_token_id": 7}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		choice string
		want   sample.Params
		eos    []int
		err    bool
	}{
		{"", m.defaultSampling(), m.gen.EOS, false},
		{"auto", m.defaultSampling(), m.gen.EOS, false},
		{"vllm", sample.Params{Temperature: 1, TopP: 1}, m.gen.EOS, false},
		{dir, sample.Params{Temperature: 0.3, TopK: 5, TopP: 1}, []int{7}, false},
		{t.TempDir(), sample.Params{}, nil, true},
		{"greedy", sample.Params{}, nil, true},
	} {
		g, err := generationConfig(tc.choice, m)
		if tc.err {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("generationConfig(%q) = %v, want an ErrInvalidConfig", tc.choice, err)
			}
			continue
		}
		mm := m
		mm.gen = g
		if err != nil || !reflect.DeepEqual(mm.defaultSampling(), tc.want) || !slices.Equal(g.EOS, tc.eos) {
			t.Errorf("generationConfig(%q) = %+v, %v; want sampling %+v, eos %v", tc.choice, g, err, tc.want, tc.eos)
		}
	}
}
