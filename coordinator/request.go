package coordinator

import (
	"container/list"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/tpfleet/tpfleet/internal/samplingpb"
	"github.com/tpfleet/tpfleet/model"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// Finish reasons, as GenerateResponse.finish_reason carries them.
const (
	FinishStop   = "stop"   // an eos or stop id was chosen (it is the last id)
	FinishLength = "length" // max_tokens ids were chosen
)

// modelInfo is what the coordinator knows of the served model: enough to check requests, and to turn
// text into ids and back.
type modelInfo struct {
	name string // the checkpoint directory's base name
	dir  string // absolute
	// config is the model's configuration, from the family its config.json names (model.LoadConfig).
	config model.Config
	cfg    model.Info // config.Info(): vocabulary, context, eos ids
	gen    model.Generation
	tok    *tokenizer.Tokenizer // nil when the directory has no tokenizer.json
	// images lays out a request's images (nil: the model takes none, and noImages says why).
	images   model.ImagePrompter
	noImages error
	// dummy: the workers generate their weights (Config.LoadFormat "dummy"); dir may hold no checkpoint.
	dummy bool
}

// loadModelInfo reads dir's config.json and generation_config.json, and its tokenizer when it has a
// tokenizer.json.
func loadModelInfo(dir string) (modelInfo, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return modelInfo{}, fmt.Errorf("%w: model %s: %w", ErrInvalidConfig, dir, err)
	}
	cfg, err := model.LoadConfig(abs)
	if err != nil {
		return modelInfo{}, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if err := cfg.Validate(); err != nil {
		return modelInfo{}, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	gen, err := model.LoadGeneration(abs, cfg.Info())
	if err != nil {
		return modelInfo{}, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	m := modelInfo{name: filepath.Base(abs), dir: abs, config: cfg, cfg: cfg.Info(), gen: gen}
	if _, err := os.Stat(filepath.Join(abs, tokenizer.TokenizerFile)); err == nil {
		if m.tok, err = tokenizer.Load(abs); err != nil {
			return modelInfo{}, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return modelInfo{}, fmt.Errorf("%w: model %s: %w", ErrInvalidConfig, abs, err)
	}
	if err := m.loadImages(); err != nil {
		return modelInfo{}, err
	}
	return m, nil
}

// maxRecvMsgSize bounds a gRPC message the coordinator accepts: a Generate with images (the HTTP
// gateway bounds a body to as much).
const maxRecvMsgSize = 64 << 20

// maxStepImageBytes bounds the encoded images of one request, and of the starts of one step (unless one
// request's are all of them): below the workers' default message size (worker.DefaultMaxRecvMsgSize).
const maxStepImageBytes = 48 << 20

// imageBytes is the size of the request's encoded images.
func (r *request) imageBytes() int {
	n := 0
	for _, im := range r.images {
		n += len(im)
	}
	return n
}

// loadImages finds how the model lays out images, when it takes them: a family with a vision tower
// (model.ImageConfig), a checkpoint that has one, and a tokenizer with its image tokens.
func (m *modelInfo) loadImages() error {
	ic, ok := m.config.(model.ImageConfig)
	switch {
	case !ok:
		m.noImages = fmt.Errorf("%w: model %s (%s) has no vision tower", model.ErrNoImages, m.name, m.cfg.Family)
		return nil
	case m.tok == nil:
		m.noImages = fmt.Errorf("%w: model %s has no tokenizer for its image tokens", model.ErrNoImages, m.name)
		return nil
	}
	p, err := ic.ImagePrompter(m.dir, m.tok.TokenID)
	switch {
	case errors.Is(err, model.ErrNoImages):
		m.noImages = fmt.Errorf("model %s: %w", m.name, err)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	default:
		m.images = p
	}
	return nil
}

// withImages checks a request's images and returns its prompt with their layout (see
// model.ImagePrompter.Expand); a prompt without any placeholder gets one per image after its BOS.
func (m modelInfo) withImages(prompt []int32, images [][]byte) ([]int32, error) {
	if m.images == nil {
		return nil, invalid("%d images: %v", len(images), m.noImages)
	}
	if n := m.images.MaxImages(); len(images) > n {
		return nil, invalid("%d images: at most %d per prompt", len(images), n)
	}
	ids := make([]int, 0, len(prompt)+len(images))
	holder := m.images.PlaceholderID()
	has := false
	for _, id := range prompt {
		ids = append(ids, int(id))
		has = has || int(id) == holder
	}
	if !has {
		at := 0
		if bos, ok := m.tok.BOS(); ok && len(ids) > 0 && ids[0] == bos { // m.images implies a tokenizer
			at = 1
		}
		ids = slices.Insert(ids, at, slices.Repeat([]int{holder}, len(images))...)
	}
	total := 0
	for i, data := range images {
		if len(data) == 0 {
			return nil, invalid("image %d: zero bytes", i)
		}
		total += len(data)
	}
	if total > maxStepImageBytes {
		return nil, invalid("%d images of %d bytes in all, more than %d", len(images), total, maxStepImageBytes)
	}
	out, err := m.images.Expand(ids, images)
	if err != nil {
		return nil, invalid("%v", err)
	}
	expanded := make([]int32, len(out))
	for i, id := range out {
		expanded[i] = int32(id)
	}
	return expanded, nil
}

// serveAs names the model name in the APIs (empty: the directory's base name) and bounds its context to
// maxLen tokens (0: max_position_embeddings).
func (m *modelInfo) serveAs(name string, maxLen int) error {
	if name != "" {
		m.name = name
	}
	switch {
	case maxLen < 0 || maxLen > m.cfg.MaxPositions:
		return fmt.Errorf("%w: max model len %d must be in [1, %d] (max_position_embeddings)", ErrInvalidConfig, maxLen, m.cfg.MaxPositions)
	case maxLen > 0:
		m.cfg.MaxPositions = maxLen
	}
	return nil
}

// noTokenizer is the error of a text request to a model without a tokenizer.
func (m modelInfo) noTokenizer() error {
	return fmt.Errorf("%w: model %s has no tokenizer (no %s in %s); send token ids", ErrNoTokenizer, m.name, tokenizer.TokenizerFile, m.dir)
}

// encode turns a prompt text into ids as HF's tokenizer(text) does: special tokens (BOS) added.
func (m modelInfo) encode(text string) ([]int32, error) {
	if m.tok == nil {
		return nil, m.noTokenizer()
	}
	ids := m.tok.Encode(text, true)
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out, nil
}

// defaultSampling is generation_config.json's sampling: its settings when do_sample is set, else greedy.
func (m modelInfo) defaultSampling() sample.Params {
	p := sample.Params{TopP: 1}
	if m.gen.DoSample {
		p.Temperature, p.TopK, p.TopP = m.gen.Temperature, m.gen.TopK, m.gen.TopP
	}
	return p
}

// invalid makes an ErrInvalidRequest error.
func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
}

// newRequest checks a GenerateRequest against the model and makes the request the scheduler runs.
func (m modelInfo) newRequest(in *pb.GenerateRequest) (*request, error) {
	if in.GetModel() != "" && in.GetModel() != m.name {
		return nil, invalid("unknown model %q: this cluster serves %q", in.GetModel(), m.name)
	}
	prompt, what := in.GetPromptIds(), "prompt id"
	switch {
	case in.GetPrompt() != "" && len(prompt) > 0:
		return nil, invalid("set prompt_ids or prompt, not both")
	case in.GetPrompt() != "":
		var err error
		if prompt, err = m.encode(in.GetPrompt()); err != nil {
			return nil, err
		}
		what = "prompt text's id"
	case len(prompt) == 0:
		return nil, invalid("empty prompt: set prompt_ids or prompt")
	}
	vocab := m.cfg.VocabSize
	for i, id := range prompt {
		if id < 0 || int(id) >= vocab {
			return nil, invalid("%s %d at index %d is outside the vocabulary [0, %d)", what, id, i, vocab)
		}
	}
	if len(in.GetImages()) > 0 {
		var err error
		if prompt, err = m.withImages(prompt, in.GetImages()); err != nil {
			return nil, err
		}
	}
	n, maxTokens := len(prompt), int(in.GetMaxTokens())
	switch {
	case maxTokens <= 0:
		return nil, invalid("max_tokens %d must be positive", maxTokens)
	case n+maxTokens > m.cfg.MaxPositions:
		return nil, invalid("%d prompt tokens + max_tokens %d exceed the model's context of %d", n, maxTokens, m.cfg.MaxPositions)
	}
	p := m.defaultSampling()
	if s := in.GetSampling(); s != nil {
		p = samplingpb.FromProto(s)
	}
	if err := p.Validate(); err != nil {
		return nil, invalid("sampling: %v", err)
	}
	for id := range p.LogitBias {
		if id < 0 || id >= vocab {
			return nil, invalid("logit_bias id %d is outside the vocabulary [0, %d)", id, vocab)
		}
	}
	if p.MinTokens > maxTokens {
		return nil, invalid("min_tokens %d must be at most max_tokens %d", p.MinTokens, maxTokens)
	}
	stop := make(map[int32]bool)
	if !in.GetIgnoreEos() {
		for _, id := range m.gen.EOS {
			stop[int32(id)] = true
		}
	}
	for i, id := range in.GetStopIds() {
		if id < 0 || int(id) >= vocab {
			return nil, invalid("stop id %d at index %d is outside the vocabulary [0, %d)", id, i, vocab)
		}
		stop[id] = true
	}
	for i, str := range in.GetStop() {
		if str == "" {
			return nil, invalid("stop string at index %d is empty", i)
		}
	}
	if len(in.GetStop()) > 0 && m.tok == nil {
		return nil, fmt.Errorf("%w: stop strings are matched on the decoded text: %w", ErrNoTokenizer, m.noTokenizer())
	}
	// min_tokens holds back the ids that would end the request: the eos ids (unless ignored) and the
	// stop ids, as vLLM's all_stop_token_ids.
	p.MinStopIDs = nil
	if p.MinTokens > 0 {
		for id := range stop {
			p.MinStopIDs = append(p.MinStopIDs, int(id))
		}
		slices.Sort(p.MinStopIDs)
	}
	r := newRequest(prompt, maxTokens, p, stop)
	r.stopStrings, r.includeStop = in.GetStop(), in.GetIncludeStopStrInOutput()
	if n := in.PromptLogprobs; n != nil {
		if *n < 0 || *n > sample.MaxTopLogprobs {
			return nil, invalid("prompt_logprobs %d must be in [0, %d]", *n, sample.MaxTopLogprobs)
		}
		r.promptLogprobs = n
	}
	r.images = in.GetImages()
	return r, nil
}

// request is one Generate call on its way through the queue and a group's batch.
type request struct {
	// Set before the request is queued, read-only afterwards.
	prompt    []int32
	images    [][]byte // encoded images for the prompt's image slots: sent with every start of its sequence
	maxTokens int
	sampling  *pb.SamplingParams
	stop      map[int32]bool
	// minTokens: stop strings are not looked for before this many tokens (vLLM).
	minTokens int
	// stopStrings end the request when its decoded text holds one (output finds them);
	// includeStop keeps the one found in the text.
	stopStrings []string
	includeStop bool
	// promptLogprobs (nil: not asked) is the number of top logprobs of each prompt position the workers
	// return with the first token.
	promptLogprobs *int32

	// Queue bookkeeping, guarded by the queue's mutex.
	elem    *list.Element
	counted bool
	timer   *time.Timer // while a resumed request waits: ends it at its deadline (queue.resume)
	// kvWaited: it has waited at the head for KV blocks (batch.admits; counted once).
	kvWaited bool

	// gen holds the ids chosen so far. Only the group holding the request touches it; a request passes
	// from group to group through the queue, whose mutex orders those accesses.
	gen []int32
	// Resumption, touched like gen: group failures since the last chosen id, the last failure, and when
	// it was first handed back since its last chosen id (zero: it is progressing).
	failures int
	lastErr  error
	stalled  time.Time

	// gone is closed when the client went away (cancel).
	gone     chan struct{}
	goneOnce sync.Once

	// Output to the Generate handler: ids not yet sent (with their logprobs when asked for), and the end.
	mu        sync.Mutex
	pending   []int32
	lps       []*pb.ChosenLogprobs
	promptLps []*pb.ChosenLogprobs // the prompt's logprobs, until taken (takePrompt)
	done      bool
	finish    string
	err       error
	notify    chan struct{} // buffer 1: something is pending; a full buffer already says so
	obs       *requestObs   // its metrics, set at admission (nil: none); used under mu
}

func newRequest(prompt []int32, maxTokens int, p sample.Params, stop map[int32]bool) *request {
	return &request{
		prompt:    append([]int32(nil), prompt...),
		maxTokens: maxTokens,
		sampling:  samplingpb.ToProto(p),
		minTokens: p.MinTokens,
		stop:      stop,
		gone:      make(chan struct{}),
		notify:    make(chan struct{}, 1),
	}
}

// progressed records that the request chose an id: its failures and its resume deadline start over.
func (r *request) progressed() {
	r.failures, r.lastErr, r.stalled = 0, nil, time.Time{}
}

// notPlaced is the error of a resumed request that no group took within d.
func (r *request) notPlaced(d time.Duration) error {
	if r.lastErr != nil {
		return fmt.Errorf("%w within %v after %d of %d tokens; its last group failed: %w", ErrNotPlaced, d, len(r.gen), r.maxTokens, r.lastErr)
	}
	return fmt.Errorf("%w within %v after %d of %d tokens (its group stopped and no TP group took it)", ErrNotPlaced, d, len(r.gen), r.maxTokens)
}

// emit hands a chosen id and its logprobs (nil when not asked for) to the client; it never blocks.
func (r *request) emit(id int32, lp *pb.ChosenLogprobs) {
	r.mu.Lock()
	r.pending = append(r.pending, id)
	if lp != nil {
		r.lps = append(r.lps, lp)
	}
	r.obs.token()
	r.mu.Unlock()
	r.wake()
}

// setPrompt hands the prompt's logprobs (rank 0's, with the first token) to the client, before that
// token is emitted.
func (r *request) setPrompt(lps []*pb.ChosenLogprobs) {
	r.mu.Lock()
	r.promptLps = lps
	r.mu.Unlock()
}

// takePrompt returns the prompt's logprobs once they came, and nil before and after.
func (r *request) takePrompt() []*pb.ChosenLogprobs {
	r.mu.Lock()
	defer r.mu.Unlock()
	lps := r.promptLps
	r.promptLps = nil
	return lps
}

// end finishes the request with a finish reason, or with err. Only the first call counts.
func (r *request) end(finish string, err error) {
	r.mu.Lock()
	if !r.done {
		r.done, r.finish, r.err = true, finish, err
		r.obs.end(finish, err, false)
	}
	r.mu.Unlock()
	r.wake()
}

func (r *request) wake() {
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

// take returns the ids emitted since the last take, their logprobs (when asked for) and, once the
// request ended, its outcome.
func (r *request) take() (ids []int32, lps []*pb.ChosenLogprobs, done bool, finish string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids, r.pending = r.pending, nil
	lps, r.lps = r.lps, nil
	return ids, lps, r.done, r.finish, r.err
}

// cancel marks the request abandoned by its client; the group holding it releases its sequence at
// the next step boundary.
func (r *request) cancel() {
	r.goneOnce.Do(func() {
		close(r.gone)
		r.mu.Lock()
		if !r.done {
			r.obs.end("", nil, true)
		}
		r.mu.Unlock()
	})
}

// scheduled records that a group took the request into its batch.
func (r *request) scheduled() {
	r.mu.Lock()
	r.obs.schedule()
	r.mu.Unlock()
}

// cancelled reports whether the client went away.
func (r *request) cancelled() bool {
	select {
	case <-r.gone:
		return true
	default:
		return false
	}
}

// finished reports whether the last chosen id ends the request, and why.
func (r *request) finished() (string, bool) {
	if n := len(r.gen); n > 0 && r.stop[r.gen[n-1]] {
		return FinishStop, true
	}
	if len(r.gen) >= r.maxTokens {
		return FinishLength, true
	}
	return "", false
}
