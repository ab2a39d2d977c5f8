package llama4

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync/atomic"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
)

// ErrInput marks a request the model cannot run: token ids outside the vocabulary, positions past the
// context. Errors wrap it with the detail. It is run.ErrInput, so callers need not know the family.
var ErrInput = run.ErrInput

// Layout says how a loaded tensor was cut for this rank; see model.Layout.
type Layout = model.Layout

// Replicated is the Layout of a whole tensor.
var Replicated = model.Replicated

// Weights gives the model this rank's slice of each tensor, by its name in a text-only checkpoint (spec
// §3.2: "model.layers.0.self_attn.q_proj.weight", without the multimodal "language_model." prefix), loaded
// into the backend. The implementation decides the slicing (a tp_plan); the model adapts its head and
// expert counts and its collectives to the Layout it is told.
type Weights = run.Weights

// Parallel is this rank's place in its tensor-parallel group. A nil Comm means a single rank.
type Parallel = run.Parallel

// Model is one rank's slice of a Llama 4 text model, ready to run on a backend.
type Model struct {
	Config  Config
	ops     backend.Ops
	comm    comm.Comm
	invFreq []float32

	embed      backend.Tensor
	embedFirst int // first vocabulary row this rank holds
	embedSplit bool
	layers     []decoderLayer
	norm       backend.Tensor
	lmHead     backend.Tensor
	lmSplit    bool

	// tally holds every MoE layer's slot counters on the device where the backend counts there
	// (backend.ExpertTallier; experts.go); nil: the layers count on the host.
	tally backend.ExpertTally

	// kvPool holds the blocks of every layer's KV caches (all layers share one shape); made on the first
	// NewSequence (a growing pool of model.DefaultKVBlockSize) unless SetKVBlocks made one.
	kvPool backend.BlockPool
}

// decoderLayer is spec §2.5's block: x += attention(norm(x)); x += ffn(norm(x)).
type decoderLayer struct {
	index            int
	inputNorm        backend.Tensor
	postNorm         backend.Tensor
	attn             attention
	ffn              feedForward
	useRoPE, qkNorm  bool
	temperatureTuned bool
	window           backend.Window
}

// attention holds this rank's heads (spec §2.3): q/k/v colwise by head, o rowwise.
type attention struct {
	q, k, v, o       backend.Tensor
	heads, kvHeads   int // local
	reduceAfterOProj bool
}

// feedForward is a dense MLP or a mixture of experts; the layer never asks which.
type feedForward interface {
	forward(s *step, h backend.Tensor) backend.Tensor
}

// mlp is SwiGLU: down(silu(gate(x)) * up(x)) (spec §2.4, dense layers and the shared expert).
type mlp struct {
	gate, up, down backend.Tensor
	partial        bool // down was split rowwise: the output needs an all-reduce
}

// moe is spec §2.4's Llama4TextMoe: the router picks top-k experts per token, the score scales the
// expert's input, and the shared expert is always added.
type moe struct {
	router       backend.Tensor
	gateUp, down backend.Tensor // [slots_local, H, 2I_local], [slots_local, I_local, H]
	firstExpert  int            // the first slot this rank holds
	topK         int
	shared       mlp
	partial      bool
	// units[i] is the checkpoint's expert of the router's row i (nil: i). slots, when the expert tensors'
	// slots over the group are not the router's rows one for one (an order with replicas), lists for
	// router row i the slots that hold its expert, and mapper sends each choice to one of them.
	units  []int
	slots  [][]int
	mapper backend.ExpertMapper
	// tokens counts the (token, choice) pairs routed to each expert of the checkpoint, slotTokens those
	// that each slot of the group computes, where the backend's routing is an backend.ExpertCounter and
	// the backend no backend.ExpertTallier (then tally counts; see Model.ExpertLoad and Model.SlotLoad).
	tokens, slotTokens []atomic.Int64
	// slotUnits[s] is the checkpoint's expert of the group's slot s; tallyFirst is the layer's first
	// counter in Model.tally, which counts slots (experts.go).
	slotUnits  []int
	tallyFirst int
	tally      backend.ExpertTally
}

// Load builds the model from w: model.Load fills the declared tensor tree (tree.go), then each part is
// checked against the Layout it came with. Every tensor the configuration has must be present.
func Load(ctx context.Context, ops backend.Ops, cfg Config, w Weights, par Parallel) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := par.Comm
	if c == nil {
		c = comm.Solo()
	}
	tree := cfg.Tree()
	if err := model.Load(ctx, tree, w); err != nil {
		return nil, fmt.Errorf("llama4: %w", err)
	}
	tw := tree.Root.(*textWeights)
	m := &Model{Config: cfg, ops: ops, comm: c, invFreq: cfg.InvFreq()}

	m.embed, m.embedSplit = tw.Embed.T, tw.Embed.Layout.Split()
	if lay := tw.Embed.Layout; lay.Split() {
		if lay.Dim != 0 {
			return nil, fmt.Errorf("llama4: embed_tokens split on dim %d: only vocabulary rows (dim 0) can be split", lay.Dim)
		}
		m.embedFirst = lay.Part * cfg.VocabSize / lay.Parts
	}
	m.norm = tw.Norm.T
	head := tw.LMHead
	if cfg.TieWordEmbeddings {
		head = tw.Embed
	}
	m.lmHead, m.lmSplit = head.T, head.Layout.Split()
	if head.Layout.Split() && head.Layout.Dim != 0 {
		return nil, fmt.Errorf("llama4: lm_head split on dim %d: only vocabulary rows (dim 0) can be split", head.Layout.Dim)
	}

	m.layers = make([]decoderLayer, cfg.NumLayers)
	for i := range m.layers {
		layer, err := m.loadLayer(&tw.Layers[i], i)
		if err != nil {
			return nil, err
		}
		m.layers[i] = layer
	}
	if err := m.newTally(); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Model) loadLayer(lw *layerWeights, i int) (decoderLayer, error) {
	cfg := m.Config
	d := decoderLayer{
		index:            i,
		useRoPE:          cfg.UseRoPE[i],
		qkNorm:           cfg.UseQKNorm && cfg.UseRoPE[i],
		temperatureTuned: cfg.TemperatureTuning && !cfg.UseRoPE[i],
		inputNorm:        lw.InputNorm.T,
		postNorm:         lw.PostNorm.T,
	}
	if cfg.Chunked[i] {
		d.window = backend.Window{Chunk: cfg.AttentionChunkSize}
	}

	aw, a := &lw.Attn, &d.attn
	a.q, a.k, a.v, a.o = aw.Q.T, aw.K.T, aw.V.T, aw.O.T
	lq, lk, lv, lo := aw.Q.Layout, aw.K.Layout, aw.V.Layout, aw.O.Layout
	a.heads = a.q.Shape()[0] / cfg.HeadDim
	a.kvHeads = a.k.Shape()[0] / cfg.HeadDim
	a.reduceAfterOProj = lo.Split()
	if lq.Split() != lo.Split() || lk.Split() != lq.Split() || lv.Split() != lq.Split() {
		return d, fmt.Errorf("llama4: layer %d: q/k/v must be split colwise exactly when o_proj is split rowwise", i)
	}
	if a.heads == 0 || a.kvHeads == 0 || a.heads%a.kvHeads != 0 ||
		a.q.Shape()[0] != a.heads*cfg.HeadDim || a.v.Shape()[0] != a.kvHeads*cfg.HeadDim {
		return d, fmt.Errorf("llama4: layer %d: local q/k/v rows %d/%d/%d are not whole heads of %d in groups",
			i, a.q.Shape()[0], a.k.Shape()[0], a.v.Shape()[0], cfg.HeadDim)
	}

	p := fmt.Sprintf("model.layers.%d.feed_forward.", i)
	var err error
	if cfg.MoE[i] {
		d.ffn, err = m.loadMoE(lw.MoE, p)
	} else {
		d.ffn, err = loadMLP(lw.MLP, p)
	}
	return d, err
}

func loadMLP(w *mlpWeights, p string) (*mlp, error) {
	f := &mlp{gate: w.Gate.T, up: w.Up.T, down: w.Down.T, partial: w.Down.Layout.Split()}
	if w.Gate.Layout.Split() != w.Down.Layout.Split() || w.Up.Layout.Split() != w.Down.Layout.Split() {
		return nil, fmt.Errorf("llama4: %s: gate/up must be split colwise exactly when down_proj is split rowwise", p)
	}
	return f, nil
}

func (m *Model) loadMoE(w *moeWeights, p string) (*moe, error) {
	E := w.Router.T.Shape()[0]
	f := &moe{topK: m.Config.TopK, router: w.Router.T, gateUp: w.GateUp.T, down: w.Down.T, units: w.Router.Layout.Units}
	lr, lgu, ld := w.Router.Layout, w.GateUp.Layout, w.Down.Layout
	shared, err := loadMLP(&w.Shared, p+"shared_expert.")
	if err != nil {
		return nil, err
	}
	f.shared = *shared
	if lr.Split() {
		return nil, fmt.Errorf("llama4: %srouter.weight must be replicated: every rank routes every token", p)
	}
	if !slices.Equal(lgu.Units, ld.Units) {
		return nil, fmt.Errorf("llama4: %sexperts: gate_up_proj and down_proj hold experts in different orders", p)
	}
	slotUnits := lgu.Units // the group's slots (nil: the checkpoint's experts in order)
	nSlots := E
	if slotUnits != nil {
		nSlots = len(slotUnits)
	}
	switch {
	case lgu.Split() != ld.Split():
		return nil, fmt.Errorf("llama4: %sexperts: gate_up_proj and down_proj must be split together", p)
	case lgu.Dim == 0 && ld.Dim == 0: // expert parallel: whole experts per rank
		local := f.gateUp.Shape()[0]
		f.firstExpert = lgu.Part * local
		if local*lgu.Parts != nSlots {
			return nil, fmt.Errorf("llama4: %sexperts: %d a rank over %d ranks, but the group has %d slots", p, local, lgu.Parts, nSlots)
		}
	case lgu.Split() && (lgu.Dim != 2 || ld.Dim != 1):
		return nil, fmt.Errorf("llama4: %sexperts: split gate_up_proj on dim 2 (packed) with down_proj on dim 1, or both on dim 0 (experts); got %d and %d", p, lgu.Dim, ld.Dim)
	case !lgu.Split() && f.gateUp.Shape()[0] != nSlots:
		return nil, fmt.Errorf("llama4: %sexperts: %d held whole, but the order has %d slots", p, f.gateUp.Shape()[0], nSlots)
	}
	if f.units != nil && len(f.units) != E {
		return nil, fmt.Errorf("llama4: %srouter.weight: an order of %d experts for %d rows", p, len(f.units), E)
	}
	if !slices.Equal(orIdentity(f.units, E), orIdentity(slotUnits, nSlots)) {
		// The router's rows are not the slots: each choice goes to one of its expert's replicas.
		em, ok := m.ops.(backend.ExpertMapper)
		if !ok {
			return nil, fmt.Errorf("llama4: %sexperts: the plan holds %d slots of %d experts (replicas of hot experts), and backend %s cannot route among replicas (backend.ExpertMapper): rebalance with --redundant-experts 0", p, nSlots, E, m.ops.Name())
		}
		f.mapper, f.slots = em, make([][]int, E)
		for i, u := range orIdentity(f.units, E) {
			for slot, su := range slotUnits {
				if su == u {
					f.slots[i] = append(f.slots[i], slot)
				}
			}
			if len(f.slots[i]) == 0 {
				return nil, fmt.Errorf("llama4: %sexperts: expert %d has no slot in the order %v", p, u, slotUnits)
			}
		}
	}
	f.tokens, f.slotTokens = make([]atomic.Int64, E), make([]atomic.Int64, nSlots)
	f.slotUnits = orIdentity(slotUnits, nSlots)
	f.partial = lgu.Split()
	return f, nil
}

// orIdentity returns units, or 0..n-1 when it is nil.
func orIdentity(units []int, n int) []int {
	if units != nil {
		return units
	}
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// count adds a step's routing to into, where the backend can count it: choice i adds to into[units[i]]
// (into[i] when units is nil).
func count(r backend.Routing, into []atomic.Int64, units []int) {
	ec, ok := r.(backend.ExpertCounter)
	if !ok || r == nil {
		return
	}
	n := make([]int64, len(into))
	if ec.CountExperts(n) != nil {
		return
	}
	for i, c := range n {
		if c == 0 {
			continue
		}
		if units != nil {
			i = units[i]
		}
		into[i].Add(c)
	}
}

// ExpertLoad returns, per decoder layer, the tokens routed to each expert of the checkpoint (in its
// numbering, whatever order the plan placed the experts in) since the model was loaded (nil for a dense
// layer); zeros where the backend does not count (neither backend.ExpertCounter nor
// backend.ExpertTallier), all nil where it failed to read its counters. Every rank of a group routes every
// token, so each reports the group's load. Safe for concurrent use, also while the model runs on a
// device backend (its counters are read on the side, see backend.ExpertTally.Counts).
func (m *Model) ExpertLoad() [][]int64 {
	if m.tally != nil {
		return m.tallied(false)
	}
	return m.load(func(f *moe) []atomic.Int64 { return f.tokens })
}

// SlotLoad is ExpertLoad per slot of the group's expert tensors (model.Layout.Units: slots rank by rank;
// the checkpoint's experts when the plan placed none): with replicas, how an expert's tokens split
// among them, and so what each rank computed.
func (m *Model) SlotLoad() [][]int64 {
	if m.tally != nil {
		return m.tallied(true)
	}
	return m.load(func(f *moe) []atomic.Int64 { return f.slotTokens })
}

func (m *Model) load(of func(*moe) []atomic.Int64) [][]int64 {
	out := make([][]int64, len(m.layers))
	for i, d := range m.layers {
		f, ok := d.ffn.(*moe)
		if !ok {
			continue
		}
		c := of(f)
		out[i] = make([]int64, len(c))
		for e := range c {
			out[i][e] = c[e].Load()
		}
	}
	return out
}

// Sequence is one sequence's decoding state on this rank: its KV caches and how many positions it holds.
type Sequence struct {
	caches   []backend.KVCache
	next     int // position of the next token
	capacity int
	freed    bool
}

// Len is the number of tokens the sequence has consumed.
func (s *Sequence) Len() int { return s.next }

// Free returns the blocks of the sequence's caches to the model's pool. The sequence cannot run again
// (ForwardBatch refuses it); freeing twice is harmless.
func (s *Sequence) Free() {
	for _, c := range s.caches {
		c.Free()
	}
	s.freed = true
}

// SetKVBlocks makes the pool that the caches of later sequences take their blocks from: blocks blocks
// of blockSize positions, or, with blocks 0, a pool that grows as needed. Sequences made before keep
// their pool.
func (m *Model) SetKVBlocks(blockSize, blocks int) error {
	if err := model.CheckKVBlockSize(blockSize); err != nil {
		return fmt.Errorf("llama4: %w", err)
	}
	kvHeads := 0
	for _, l := range m.layers {
		if kvHeads != 0 && l.attn.kvHeads != kvHeads {
			return fmt.Errorf("llama4: layers with %d and %d local kv heads cannot share a block pool", kvHeads, l.attn.kvHeads)
		}
		kvHeads = l.attn.kvHeads
	}
	p, err := m.ops.NewBlockPool(max(kvHeads, 1), m.Config.HeadDim, blockSize, blocks)
	if err != nil {
		return fmt.Errorf("llama4: kv block pool of %d blocks of %d: %w", blocks, blockSize, err)
	}
	m.kvPool = p
	return nil
}

// KVUsage reports the KV blocks in use by live sequences, the blocks the pool has, and their size in
// positions (all 0 before the first sequence when no pool was set).
func (m *Model) KVUsage() (used, total, blockSize int) {
	if m.kvPool == nil {
		return 0, 0, 0
	}
	used, total = m.kvPool.Usage()
	return used, total, m.kvPool.BlockSize()
}

// NewSequence makes an empty sequence with room for capacity tokens (prompt and generated).
func (m *Model) NewSequence(capacity int) (*Sequence, error) {
	if capacity <= 0 || capacity > m.Config.MaxPositions {
		return nil, fmt.Errorf("%w: context of %d tokens: must be in [1, max_position_embeddings=%d]", ErrInput, capacity, m.Config.MaxPositions)
	}
	if m.kvPool == nil {
		if err := m.SetKVBlocks(model.DefaultKVBlockSize, 0); err != nil {
			return nil, err
		}
	}
	s := &Sequence{caches: make([]backend.KVCache, 0, len(m.layers)), capacity: capacity}
	for i, l := range m.layers {
		c, err := m.ops.NewKVCache(m.kvPool, capacity, l.window)
		if err != nil {
			s.Free()
			return nil, fmt.Errorf("llama4: layer %d kv cache: %w", i, err)
		}
		s.caches = append(s.caches, c)
	}
	return s, nil
}

// Forward runs ids through the model at the sequence's next positions, appending to its caches, and returns
// logits [T, vocab] for every new token when allLogits is set, else [1, vocab] for the last one.
func (m *Model) Forward(ctx context.Context, seq *Sequence, ids []int, allLogits bool) (backend.Tensor, error) {
	return m.ForwardBatch(ctx, []*Sequence{seq}, [][]int{ids}, allLogits)
}

// span is one sequence's rows in a batch and the positions of its new tokens.
type span struct {
	start, end int
	pos        []int
	seq        *Sequence
}

// Images are image features for the <|patch|> slots of a sequence's new tokens (spec §6.4): one row of
// the text model's hidden size per id equal to PatchID, in the order the ids hold them (package
// model/llama4/vision's Model.Features). The slots' own embeddings are replaced; nothing else changes.
type Images struct {
	PatchID  int
	Features []float32 // [slots, hidden_size], host memory; read, never kept
}

// ForwardBatch runs new tokens of several sequences in one pass: matrix products, norms and experts see
// every row at once, so each weight is read once per step, and attention runs per sequence against its own
// cache. ids[i] feeds seqs[i]. It returns logits for every new token of every sequence in order when
// allLogits is set, else the last token's of each sequence ([len(seqs), vocab]). On error no sequence
// advances, but caches may hold the failed step's keys: start such a sequence again.
func (m *Model) ForwardBatch(ctx context.Context, seqs []*Sequence, ids [][]int, allLogits bool) (backend.Tensor, error) {
	return m.forwardBatch(ctx, seqs, ids, nil, allLogits)
}

// ForwardImages is Forward with images: the features in images take the place of the embeddings of
// the <|patch|> ids, as Llama4ForConditionalGeneration's masked_scatter does (spec §6.4). Image tokens
// attend causally like text. Errors wrap ErrInput when the slots and the feature rows do not match.
func (m *Model) ForwardImages(ctx context.Context, seq *Sequence, ids []int, images Images, allLogits bool) (backend.Tensor, error) {
	return m.forwardBatch(ctx, []*Sequence{seq}, [][]int{ids}, []Images{images}, allLogits)
}

// forwardBatch is ForwardBatch with optional images per sequence (nil: none).
func (m *Model) forwardBatch(ctx context.Context, seqs []*Sequence, ids [][]int, images []Images, allLogits bool) (backend.Tensor, error) {
	if len(seqs) == 0 || len(seqs) != len(ids) {
		return nil, fmt.Errorf("%w: %d sequences with %d token lists", ErrInput, len(seqs), len(ids))
	}
	spans := make([]span, len(seqs))
	var flat, pos []int
	for i, seq := range seqs {
		if err := m.checkInput(seq, ids[i]); err != nil {
			return nil, fmt.Errorf("sequence %d: %w", i, err)
		}
		for j := 0; j < i; j++ {
			if seqs[j] == seq {
				return nil, fmt.Errorf("%w: sequence %d appears twice in one batch", ErrInput, i)
			}
		}
		sp := span{start: len(flat), end: len(flat) + len(ids[i]), seq: seq}
		for k := range ids[i] {
			sp.pos = append(sp.pos, seq.next+k)
		}
		flat, pos = append(flat, ids[i]...), append(pos, sp.pos...)
		spans[i] = sp
	}
	slots, err := m.imageSlots(spans, flat, images)
	if err != nil {
		return nil, err
	}
	run := func() (backend.Tensor, error) { return m.forward(ctx, flat, pos, spans, slots, allLogits) }
	var logits backend.Tensor
	if rec, ok := m.ops.(backend.StepRecorder); ok && len(flat) == len(seqs) && !allLogits && slots == nil {
		// A decode step: the same ops for every step of this many sequences, so the backend may record
		// them once (a CUDA graph) and replay them.
		logits, err = rec.Step(fmt.Sprintf("llama4 %p decode %d", m, len(seqs)), run)
	} else {
		logits, err = run()
	}
	if err != nil {
		return nil, err
	}
	for _, sp := range spans {
		sp.seq.next += len(sp.pos)
	}
	return logits, nil
}

// forward is the model proper: embedding, decoder layers, final norm and lm_head over the batch's rows
// flat at positions pos. It has no effect besides the backend's ops (StepRecorder may run it twice).
func (m *Model) forward(ctx context.Context, flat, pos []int, spans []span, slots []imageSlot, allLogits bool) (backend.Tensor, error) {
	s := &step{ctx: ctx, ops: m.ops, comm: m.comm, pos: pos}
	eps := m.Config.RMSNormEps
	x := s.allReduce(s.embed(m.embed, flat, m.embedFirst), m.embedSplit) // spec §2.1
	if slots != nil {
		x = m.placeImages(s, x, len(flat), slots) // spec §6.4
	}
	// h is always the norm of x that the next block reads: each residual add is fused with the norm
	// after it, the last layer's with the final norm.
	next := func(l int) backend.Tensor {
		if l+1 < len(m.layers) {
			return m.layers[l+1].inputNorm
		}
		return m.norm
	}
	h := s.rmsNorm(x, next(-1), eps)
	for l := range m.layers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		x, h = m.layers[l].forward(s, m, x, h, next(l), pos, spans)
	}
	if !allLogits { // only the last token of each sequence needs logits
		last := make([]backend.Tensor, len(spans))
		for i, sp := range spans {
			last[i] = s.rows(h, sp.end-1, sp.end)
		}
		h = s.concat(last...)
	}
	logits := s.allGather(s.linear(h, m.lmHead), m.lmSplit) // lm_head, vocab-parallel
	if s.err != nil {
		return nil, fmt.Errorf("llama4: forward: %w", s.err)
	}
	return logits, nil
}

// imageSlot is one image feature row and the batch row whose embedding it replaces.
type imageSlot struct {
	row     int
	feature []float32
}

// imageSlots pairs the <|patch|> rows of each sequence with its feature rows, in order; nil when no
// sequence has images.
func (m *Model) imageSlots(spans []span, flat []int, images []Images) ([]imageSlot, error) {
	var out []imageSlot
	h := m.Config.HiddenSize
	for i, im := range images {
		if im.Features == nil {
			continue
		}
		if len(im.Features)%h != 0 {
			return nil, fmt.Errorf("%w: sequence %d: %d image feature values are not rows of hidden_size %d", ErrInput, i, len(im.Features), h)
		}
		rows := len(im.Features) / h
		n := 0
		for r := spans[i].start; r < spans[i].end; r++ {
			if flat[r] != im.PatchID {
				continue
			}
			if n < rows {
				out = append(out, imageSlot{row: r, feature: im.Features[n*h : (n+1)*h]})
			}
			n++
		}
		if n != rows {
			return nil, fmt.Errorf("%w: sequence %d: %d <|patch|> slots (id %d) for %d image feature rows", ErrInput, i, n, im.PatchID, rows)
		}
	}
	return out, nil
}

// placeImages returns x [rows, hidden] with the slots' rows replaced by their features: the untouched
// runs of rows and the feature runs concatenated in order.
func (m *Model) placeImages(s *step, x backend.Tensor, rows int, slots []imageSlot) backend.Tensor {
	h := m.Config.HiddenSize
	var parts []backend.Tensor
	next := 0
	for i := 0; i < len(slots); {
		j := i + 1
		for j < len(slots) && slots[j].row == slots[j-1].row+1 {
			j++
		}
		if start := slots[i].row; start > next {
			parts = append(parts, s.rows(x, next, start))
		}
		run := make([]float32, 0, (j-i)*h)
		for _, sl := range slots[i:j] {
			run = append(run, sl.feature...)
		}
		parts = append(parts, s.do("image_features", func() (backend.Tensor, error) {
			return s.ops.FromFloat32([]int{j - i, h}, run)
		}))
		next = slots[j-1].row + 1
		i = j
	}
	if next < rows {
		parts = append(parts, s.rows(x, next, rows))
	}
	return s.concat(parts...)
}

// checkInput rejects tokens outside the vocabulary or past the sequence's context.
func (m *Model) checkInput(seq *Sequence, ids []int) error {
	if len(ids) == 0 {
		return fmt.Errorf("%w: no tokens", ErrInput)
	}
	if seq.freed {
		return fmt.Errorf("%w: the sequence was freed", ErrInput)
	}
	for i, id := range ids {
		if id < 0 || id >= m.Config.VocabSize {
			return fmt.Errorf("%w: token id %d at index %d is outside the vocabulary [0, %d)", ErrInput, id, i, m.Config.VocabSize)
		}
	}
	if seq.next+len(ids) > seq.capacity {
		return fmt.Errorf("%w: %d tokens after %d exceed the sequence's context of %d", ErrInput, len(ids), seq.next, seq.capacity)
	}
	return nil
}

// forward is spec §2.5: x = x + attention(input_norm(x)); x = x + ffn(post_attention_norm(x)). h is
// input_norm(x); it returns the new x and nextNorm(x), the norm the next block reads.
func (d *decoderLayer) forward(s *step, m *Model, x, h, nextNorm backend.Tensor, pos []int, spans []span) (backend.Tensor, backend.Tensor) {
	eps := m.Config.RMSNormEps
	x, h = s.addNorm(x, d.attention(s, m, h, pos, spans), d.postNorm, eps)
	return s.addNorm(x, d.ffn.forward(s, h), nextNorm, eps)
}

// attention is spec §2.3 for this rank's heads. Projections, RoPE and norms run on all rows; the cache
// update and the attention itself per sequence.
func (d *decoderLayer) attention(s *step, m *Model, h backend.Tensor, pos []int, spans []span) backend.Tensor {
	a, cfg := &d.attn, m.Config
	t := len(pos)
	qkv := s.linears(h, a.q, a.k, a.v)
	q := s.reshape(qkv[0], t, a.heads, cfg.HeadDim)
	k := s.reshape(qkv[1], t, a.kvHeads, cfg.HeadDim)
	v := s.reshape(qkv[2], t, a.kvHeads, cfg.HeadDim)
	var tr backend.QKTransform
	if d.useRoPE { // (a) RoPE on interleaved pairs, then (b) weightless RMS qk-norm
		tr.InvFreq, tr.Norm, tr.Eps = m.invFreq, d.qkNorm, cfg.RMSNormEps
	}
	if d.temperatureTuned { // (c) NoPE layers scale q by the absolute position's temperature
		tr.QScale = make([]float32, t)
		for i, p := range pos {
			tr.QScale[i] = cfg.AttnTemperature(p)
		}
	}
	scale := float32(1 / math.Sqrt(float64(cfg.HeadDim)))
	as := make([]backend.AttendSpan, len(spans))
	for i, sp := range spans {
		as[i] = backend.AttendSpan{Cache: sp.seq.caches[d.index], Start: sp.start, End: sp.end, Pos: sp.pos}
	}
	var att backend.Tensor
	if qa, ok := s.ops.(backend.QKAttender); ok { // (a) to (e) for every sequence at once
		att = s.attendQK(qa, q, k, v, as, d.window, scale, tr)
	} else if ba, ok := s.ops.(backend.BatchAttender); ok { // (d) and (e) for every sequence at once
		q, k = s.transformQK(q, k, pos, tr)
		att = s.attendBatch(ba, q, k, v, as, d.window, scale)
	} else {
		q, k = s.transformQK(q, k, pos, tr)
		outs := make([]backend.Tensor, len(spans))
		for i, sp := range spans {
			cache := sp.seq.caches[d.index]
			s.appendKV(cache, s.rows(k, sp.start, sp.end), s.rows(v, sp.start, sp.end), sp.pos) // (d)
			outs[i] = s.attention(s.rows(q, sp.start, sp.end), cache, sp.pos, d.window, scale)
		}
		att = s.concat(outs...)
	}
	o := s.linear(s.reshape(att, t, a.heads*cfg.HeadDim), a.o) // (f)
	return s.allReduce(o, a.reduceAfterOProj)
}

func (f *mlp) forward(s *step, h backend.Tensor) backend.Tensor {
	return s.allReduce(f.local(s, h), f.partial)
}

// local is the SwiGLU product without the reduction, so the MoE can reduce shared and routed together.
func (f *mlp) local(s *step, h backend.Tensor) backend.Tensor {
	act, _ := s.gated(h, f.gate, f.up)
	return s.linear(act, f.down)
}

// forward is spec §2.4: top-k on raw router logits, sigmoid scores scale the experts' input, plus the shared
// expert. When both are partial sums (tensor parallel) they are added before one all-reduce; under expert
// parallelism only the routed sum is partial.
func (f *moe) forward(s *step, h backend.Tensor) backend.Tensor {
	act, p := s.gated(h, f.shared.gate, f.shared.up, f.router) // every product of h at once
	routing := s.route(p[0], f.topK)
	if f.tally == nil {
		count(routing, f.tokens, f.units)
	}
	if f.slots != nil {
		routing = s.mapExperts(f.mapper, routing, f.slots)
	}
	f.countSlots(s, routing)
	shared := s.linear(act, f.shared.down)
	if f.partial == f.shared.partial {
		return s.allReduce(s.expertsAdd(h, routing, f.gateUp, f.down, f.firstExpert, shared), f.partial)
	}
	routed := s.experts(h, routing, f.gateUp, f.down, f.firstExpert)
	return s.add(s.allReduce(shared, f.shared.partial), s.allReduce(routed, f.partial))
}
