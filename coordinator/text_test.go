package coordinator

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// testTokenizer holds a tokenizer whose ids all fit the fixtures' vocabulary of 512: 256 byte tokens
// (id = byte), merges, and Llama 4's special tokens at 490-511 (BOS 490).
const testTokenizer = "../testdata/tokenizer"

// modelWithTokenizer returns a temporary copy of the fixture with the test tokenizer's files added, in
// a directory of the fixture's name, and the tokenizer.
func modelWithTokenizer(t *testing.T) (string, *tokenizer.Tokenizer) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), filepath.Base(fixture))
	if err := os.CopyFS(dir, os.DirFS(fixture)); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{tokenizer.TokenizerFile, tokenizer.ConfigFile} {
		data, err := os.ReadFile(filepath.Join(testTokenizer, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, tok
}

// TestText: with a tokenizer in the model directory, Generate takes a text prompt (encoded with BOS)
// and every response carries the text of its ids, whole characters only, special tokens left out, the
// rest of an incomplete character flushed at the end; Tokenize encodes. Exactly one of prompt and
// prompt_ids is accepted.
func TestText(t *testing.T) {
	dir, tok := modelWithTokenizer(t)
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	// "ok ✓ é", a special token, then ✓ cut after two of its three bytes (ids are bytes below 256).
	script := []int32{111, 107, 32, 226, 156, 147, 32, 346, 500, 226, 156}
	prompt := tok.Encode("hello", true) // [490 394]: BOS, "hello"
	ws[0].setNext(func(seq []int32) int32 {
		if n := len(seq) - len(prompt); n < len(script) {
			return script[n]
		}
		return 0
	})
	cfg := testConfig(t)
	cfg.Model = dir
	c, cli := startCoordinator(t, cfg)
	waitReady(t, c)

	ids := make([]int, len(script))
	for i, id := range script {
		ids[i] = int(id)
	}
	want, err := tok.Decode(ids, true)
	if err != nil || want != "ok ✓ é\uFFFD" {
		t.Fatalf("Decode(script) = %q, %v; want \"ok ✓ é\\uFFFD\"", want, err)
	}

	stream, err := cli.gen.Generate(testCtx(t), &pb.GenerateRequest{Prompt: "hello", MaxTokens: int32(len(script)), Sampling: &pb.SamplingParams{TopP: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var got []int32
	var text strings.Builder
	var last *pb.GenerateResponse
	check := true
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, msg.GetIds()...)
		text.WriteString(msg.GetText())
		if !utf8.ValidString(msg.GetText()) {
			t.Errorf("response text %q is not valid UTF-8", msg.GetText())
		}
		// Up to ✓'s last byte, the text holds back the bytes of an unfinished character: the text so far
		// is the ids' decoding without its trailing U+FFFD. (A message may carry several ids under load.)
		if n := len(got); check && n <= 6 {
			w, _ := tok.Decode(ids[:n], true)
			if want := strings.TrimRight(w, "\uFFFD"); text.String() != want {
				t.Errorf("after %d ids: text so far %q, want %q (the decoding %q without an unfinished character)", n, text.String(), want, w)
			}
		} else {
			check = false
		}
		last = msg
	}
	if !slices.Equal(got, script) || text.String() != want {
		t.Errorf("Generate(prompt) = ids %v, text %q; want %v, %q", got, text.String(), script, want)
	}
	if last.GetFinishReason() != FinishLength || last.GetPromptTokens() != int32(len(prompt)) || !strings.HasSuffix(last.GetText(), "\uFFFD") {
		t.Errorf("last response = %v, want finish length, %d prompt tokens, the flushed U+FFFD", last, len(prompt))
	}
	if steps := ws[0].recorded(); len(steps) == 0 || !slices.Equal(steps[0].GetSeqs()[0].GetIds(), []int32{490, 394}) {
		t.Errorf("first step = %v, want the prompt [490 394]", steps)
	}

	// The Client: the same ids and text, from ids too; emit's pieces add up to the text.
	for _, req := range []client.GenerateRequest{
		{Prompt: "hello", MaxTokens: len(script), Sampling: greedy()},
		{PromptIDs: []int{490, 394}, MaxTokens: len(script), Sampling: greedy()},
	} {
		var pieces strings.Builder
		res, err := cli.Generate(testCtx(t), req, func(_ []int, s string) error { pieces.WriteString(s); return nil })
		if err != nil || !slices.Equal(res.IDs, ids) || res.Text != want || pieces.String() != want || res.PromptTokens != 2 {
			t.Errorf("Client.Generate(%+v) = %+v (emitted %q), %v; want %v, %q, 2 prompt tokens", req, res, pieces.String(), err, ids, want)
		}
	}

	for _, tc := range []struct {
		name string
		req  *pb.GenerateRequest
		msg  string
	}{
		{"text and ids", &pb.GenerateRequest{Prompt: "hello", PromptIds: []int32{1}, MaxTokens: 4}, "not both"},
		{"neither", &pb.GenerateRequest{MaxTokens: 4}, "empty prompt: set prompt_ids or prompt"},
		{"text past the context", &pb.GenerateRequest{Prompt: strings.Repeat("q", 300), MaxTokens: 4}, "exceed the model's context of 256"},
	} {
		stream, err := cli.gen.Generate(testCtx(t), tc.req)
		if err == nil {
			_, err = stream.Recv()
		}
		if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("Generate(%s) = %v, want InvalidArgument with %q", tc.name, err, tc.msg)
		}
	}

	for _, tc := range []struct {
		text       string
		addSpecial bool
		want       []int
	}{
		{"Hello, world!", true, []int{490, 310, 44, 296, 33}},
		{"Hello, world!", false, []int{310, 44, 296, 33}},
		{"", true, []int{490}},
		{"", false, []int{}},
	} {
		got, err := cli.Tokenize(testCtx(t), "moe-top1", tc.text, tc.addSpecial)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Tokenize(%q, %v) = %v, %v; want %v", tc.text, tc.addSpecial, got, err, tc.want)
		}
	}
	if _, err := cli.Tokenize(testCtx(t), "other", "hi", true); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Tokenize(unknown model) = %v, want InvalidArgument", err)
	}
	models, err := cli.gen.ListModels(testCtx(t), &pb.ListModelsRequest{})
	if err != nil || len(models.GetModels()) != 1 || models.GetModels()[0].GetName() != "moe-top1" || models.GetModels()[0].GetVocabSize() != 512 {
		t.Errorf("ListModels = %v, %v; want moe-top1 with vocabulary 512", models, err)
	}
}

// TestTextStreamUnknownID: an id the tokenizer does not know (a model vocabulary larger than the
// tokenizer's) gives no text and does not stop the stream.
func TestTextStreamUnknownID(t *testing.T) {
	_, tok := modelWithTokenizer(t)
	ts := &textStream{dec: tok.NewDecoder(true), log: zap.NewNop()}
	if got := ts.add([]int32{104, 9999, 105}, false); got != "hi" {
		t.Errorf("add([104 9999 105]) = %q, want %q", got, "hi")
	}
	if got := ts.add([]int32{195}, true); got != "\uFFFD" {
		t.Errorf("add([195], last) = %q, want U+FFFD for the cut character", got)
	}
}

// TestBadTokenizer: a tokenizer.json that does not load fails New.
func TestBadTokenizer(t *testing.T) {
	dir, _ := modelWithTokenizer(t)
	if err := os.WriteFile(filepath.Join(dir, tokenizer.TokenizerFile), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.Model = dir
	if _, err := New(cfg); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tokenizer.TokenizerFile) {
		t.Errorf("New(model with a broken tokenizer.json) = %v, want ErrInvalidConfig naming the file", err)
	}
}
