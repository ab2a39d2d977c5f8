package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/model"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/sample"
	"github.com/tpfleet/tpfleet/shard"
)

// modelFlags are the flags of every command that loads a model in this process.
type modelFlags struct {
	dir      string
	device   string
	threads  int
	logLevel string
	par      parallelFlags
	quant    quantFlags
	load     modelrun.LoadConfig // --load-workers, --load-chunk, --load-direct
	offload  bool                // --offload-experts
	// backendConfig holds the registered backends' own flags (backend.BindFlags), by backend name.
	backendConfig map[string]backend.FlagConfig
}

func (f *modelFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&f.dir, "model", "", "checkpoint directory (config.json and *.safetensors)")
	fs.StringVar(&f.device, "device", "cpu", "where to run: "+deviceChoices()+" (a GPU backend: one GPU per rank, rank r of --tp N on GPU r, or --gpu with --rank)")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads for matrix products (0: all cores)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	f.quant.addFlags(fs, "")
	f.load.AddFlags(fs)
	fs.BoolVar(&f.offload, "offload-experts", false, "keep the routed experts in pinned host memory and copy the ones each step chooses to the GPU (cuda; such steps run without CUDA graphs)")
	f.par.add(fs)
	f.backendConfig = backend.BindFlags(fs)
}

func (f *modelFlags) check() error {
	if f.dir == "" {
		return usagef("--model is required")
	}
	if err := checkDevice(f.device); err != nil {
		return err
	}
	if f.threads < 0 {
		return usagef("--threads %d must be >= 0", f.threads)
	}
	if _, err := f.quant.format(); err != nil {
		return err
	}
	if err := f.load.Validate(); err != nil {
		return usagef("%v", err)
	}
	return f.par.check()
}

// quantFlags are --quantization and --quantization-group.
type quantFlags struct {
	name  string
	group int
}

// addFlags binds the flags; prefix begins their usage texts ("with --standalone: ").
func (q *quantFlags) addFlags(fs *flag.FlagSet, prefix string) {
	fs.StringVar(&q.name, "quantization", "", prefix+"quantise the checkpoint's linear and expert weights at load: none, fp8 (rowwise, dynamic per-token activations) or int4 (weight-only, group-wise); lm_head and the routing weights stay bf16")
	fs.IntVar(&q.group, "quantization-group", quant.DefaultGroupSize, prefix+"int4: input columns per scale")
}

// format is the weight format the flags ask for (quant.ParseFormat); a bad value is a usage error.
func (q quantFlags) format() (quant.Format, error) {
	f, err := quant.ParseFormat(q.name, q.group)
	if err != nil {
		return quant.Format{}, usagef("%v", err)
	}
	return f, nil
}

// deviceChoices lists the registered backends for usage texts: "cpu or cuda".
func deviceChoices() string { return strings.Join(backend.Names(), " or ") }

// checkDevice rejects a --device that no backend registered, listing those that did.
func checkDevice(name string) error {
	if _, err := backend.Lookup(name); err != nil {
		return usagef("--device %q: want %s", name, deviceChoices())
	}
	return nil
}

// newLogger writes human-readable structured logs to stderr.
func newLogger(w io.Writer, level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, usagef("--log-level: %v", err)
	}
	enc := zap.NewDevelopmentEncoderConfig()
	enc.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(w), lvl)
	return zap.New(core), nil
}

// loaded is a model ready to run in this process: the ranks of its TP group that run here.
type loaded struct {
	*group
	gen  model.Generation
	ckpt *safetensors.Checkpoint
	// phases times the start-up: the process, the devices (context, kernels), the weight load, and the
	// first step once the command records it (firstStep).
	phases *phase.Recorder
	gpu    bool // the device is a GPU backend's: the phase table is printed
}

// firstStep records the first forward pass, which began at start.
func (l *loaded) firstStep(start time.Time, detail string) {
	l.phases.Since(phase.FirstStep, start, detail)
	l.phases.Since(phase.Ready, l.phases.Start(), "process start to the first step's end")
}

// report logs the start-up phases in one line and, on a GPU backend, prints their table on stderr.
func (l *loaded) report(log *zap.Logger, stderr io.Writer) {
	log.Info("start-up", l.phases.Field())
	if l.gpu && l.leader {
		fmt.Fprint(stderr, l.phases.Table())
	}
}

func (l *loaded) Close() error { return errors.Join(l.group.Close(), l.ckpt.Close()) }

// loadModel reads config, generation config and this process's ranks' weights from f.dir, logging progress.
// Before any weight is read, check (when not nil) validates the request against the config, so bad input
// fails fast.
func loadModel(ctx context.Context, f modelFlags, log *zap.Logger, check func(model.Info) error) (*loaded, error) {
	start := time.Now()
	phases := phase.NewRecorder(phase.ProcessStart())
	cfg, err := model.LoadConfig(f.dir)
	if err != nil {
		return nil, err
	}
	if check != nil {
		if err := check(cfg.Info()); err != nil {
			return nil, err
		}
	}
	gen, err := model.LoadGeneration(f.dir, cfg.Info())
	if err != nil {
		return nil, err
	}
	plan, err := resolvePlan(cfg, f.par.plan)
	if err != nil {
		return nil, err
	}
	ckpt, err := safetensors.OpenCheckpoint(f.dir)
	if err != nil {
		return nil, err
	}
	g, err := loadRanks(ctx, f, cfg, ckpt, plan, log, phases)
	if err != nil {
		ckpt.Close()
		return nil, err
	}
	log.Info("model loaded", zap.Int("ranks", len(g.ranks)), zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return &loaded{group: g, gen: gen, ckpt: ckpt, phases: phases, gpu: backend.HasDevices(f.device)}, nil
}

// loadRanks loads the ranks this process runs, each on its own backend (newRankOps).
func loadRanks(ctx context.Context, f modelFlags, cfg model.Config, ckpt *safetensors.Checkpoint, plan shard.Plan, log *zap.Logger, phases *phase.Recorder) (*group, error) {
	opened := time.Now()
	g, allOps, ranks, err := newRankOps(ctx, f)
	if err != nil {
		return nil, err
	}
	if sr, ok := allOps[0].(backend.StartupReporter); ok {
		phases.AddAll(sr.StartupPhases()) // the first rank's: the others' run beside it
	} else {
		phases.Since("device", opened, fmt.Sprintf("%d ranks", len(allOps)))
	}
	comms := g.comms
	specs, prefix := model.Tensors(cfg), cfg.Info().Prefix
	format, err := f.quant.format()
	if err != nil {
		g.Close()
		return nil, err
	}
	view, err := shard.NewView(cfg, ckpt)
	if err != nil {
		g.Close()
		return nil, err
	}
	for i, rank := range ranks {
		ops := allOps[i]
		// Every rank, TP 1 included, reads its manifest's slices through the load pipeline: several readers,
		// the backend's staging buffers, quantisation after the copy where the backend can.
		man, err := shard.NewManifest(cfg, view, plan, f.par.tp, rank)
		if err != nil {
			g.Close()
			return nil, err
		}
		rw := modelrun.NewRankWeights(shard.NewRankReader(view, man), ops).WithFormat(cfg, format).WithLog(log.With(zap.Int("rank", rank)))
		var names []string
		for _, s := range specs {
			if _, ok := man.Lookup(prefix + s.Name); ok {
				names = append(names, s.Name)
			}
		}
		loadStart := time.Now()
		if err := rw.Prefetch(ctx, names, f.load); err != nil {
			g.Close()
			return nil, err
		}
		var w modelrun.Weights = rw
		bytesOf, memBytes := man.BytesOf, rw.MemoryBytes
		if f.offload {
			if w, err = modelrun.NewOffloadWeights(w, cfg, ops); err != nil {
				rw.Close()
				g.Close()
				return nil, err
			}
		}
		bytes := int64(0)
		for _, s := range specs {
			bytes += bytesOf(s.Name)
		}
		log.Info("loading model", zap.String("model", f.dir), zap.String("device", ops.Name()),
			zap.Int("rank", rank), zap.Int("tp", f.par.tp), zap.String("plan", f.par.plan),
			zap.String("family", cfg.Info().Family), zap.Int("tensors", len(specs)), zap.String("size", mib(bytes)),
			zap.Stringer("format", format))
		progress := &modelrun.Progress{Weights: w, Log: log.With(zap.Int("rank", rank)), Total: len(specs), TotalBytes: bytes, BytesOf: bytesOf}
		m, err := modelrun.Open(ctx, ops, cfg, progress, modelrun.Parallel{Comm: comms[i]})
		if cerr := rw.Close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			g.Close()
			return nil, fmt.Errorf("rank %d: %w", rank, err)
		}
		if s, ok := ops.(backend.Synchronizer); ok { // the weights are on the device when their copies end
			if err := s.Synchronize(); err != nil {
				g.Close()
				return nil, fmt.Errorf("rank %d: %w", rank, err)
			}
		}
		if i == 0 {
			phases.AddAll(rw.LoadStats().Phases(loadStart, bytes))
		}
		log.Info("weights in memory", zap.Int("rank", rank), zap.String("stored", mib(bytes)), zap.String("in-memory", mib(memBytes())), zap.Stringer("format", format))
		g.ranks = append(g.ranks, m)
	}
	return g, nil
}

// checkIDs rejects token ids outside [0, vocab).
func checkIDs(ids []int, vocab int) error {
	for i, id := range ids {
		if id < 0 || id >= vocab {
			return fmt.Errorf("token id %d at index %d is outside the vocabulary [0, %d)", id, i, vocab)
		}
	}
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// parseIDs parses "1,2,3".
func parseIDs(s string) ([]int, error) {
	if strings.TrimSpace(s) == "" {
		return nil, usagef("--ids is empty")
	}
	parts := strings.Split(s, ",")
	ids := make([]int, len(parts))
	for i, p := range parts {
		v, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil {
			return nil, usagef("--ids: %q is not an integer", p)
		}
		ids[i] = v
	}
	return ids, nil
}

type generateFlags struct {
	modelFlags
	ids         string
	prompt      string // text, instead of ids (text.go)
	maxTokens   int
	temperature float64
	topK        int
	topP        float64
	seed        uint64
	ignoreEOS   bool
	json        bool
	images      imageFiles // --image (images.go)
	// prefillChunk runs the prompt in pieces of at most this many tokens (0: whole).
	prefillChunk int
}

func runGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f generateFlags
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.modelFlags.add(fs)
	fs.StringVar(&f.ids, "ids", "", "prompt token ids, comma-separated")
	fs.StringVar(&f.prompt, "prompt", "", "prompt text, encoded with the model's tokenizer (BOS added); instead of --ids; prints text")
	fs.IntVar(&f.maxTokens, "max-tokens", 32, "new tokens at most")
	fs.IntVar(&f.prefillChunk, "prefill-chunk", 0, "run the prompt through the model in pieces of at most this many tokens (chunked prefill; 0: whole)")
	fs.Float64Var(&f.temperature, "temperature", 0, "sampling temperature; 0 is greedy (default: generation_config.json)")
	fs.IntVar(&f.topK, "top-k", 0, "sample from the k most likely tokens; 0 disables (default: generation_config.json)")
	fs.Float64Var(&f.topP, "top-p", 1, "sample from the smallest set of tokens whose probability reaches p (default: generation_config.json)")
	fs.Uint64Var(&f.seed, "seed", 0, "random seed for sampling")
	fs.BoolVar(&f.ignoreEOS, "ignore-eos", false, "do not stop at the checkpoint's eos ids")
	fs.BoolVar(&f.json, "json", false, `print one JSON object: {"ids": [...], "finish_reason": ..., "prompt_tokens": N, "text": ...}`)
	fs.Var(&f.images, "image", "image file (PNG, JPEG, GIF, WebP) for the prompt's <|image|> placeholders in order; repeatable; with none in the prompt, one per image goes first")
	remote := addRemoteFlags(fs) // --addr: generate on a coordinator (remote.go)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if remote.addr != "" {
		return runRemoteGenerate(ctx, fs, f, *remote, stdout, stderr)
	}
	if err := f.check(); err != nil {
		return err
	}
	if f.maxTokens <= 0 {
		return usagef("--max-tokens %d must be positive", f.maxTokens)
	}
	if f.prefillChunk < 0 {
		return usagef("--prefill-chunk %d must not be negative", f.prefillChunk)
	}
	if err := (sample.Params{Temperature: f.temperature, TopK: f.topK, TopP: f.topP}).Validate(); err != nil {
		return usagef("%v", err)
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr

	// The prompt: --ids, or --prompt through the model's tokenizer (text.go).
	prompt, tok, err := localPrompt(fs, f, log)
	if err != nil {
		return err
	}
	var pix *pixels
	if len(f.images) > 0 { // images.go: the prompt's image tokens and pixel values
		if prompt, pix, err = imagePrompt(f.dir, f.images, prompt, tok); err != nil {
			return err
		}
	}

	m, err := loadModel(ctx, f.modelFlags, log, func(cfg model.Info) error {
		if err := checkIDs(prompt, cfg.VocabSize); err != nil {
			return err
		}
		if len(prompt)+f.maxTokens > cfg.MaxPositions {
			return fmt.Errorf("%d prompt tokens + --max-tokens %d exceed the model's context of %d", len(prompt), f.maxTokens, cfg.MaxPositions)
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer m.Close()

	features, err := imageFeatures(ctx, f.dir, m.ckpt, m.backends[0], pix, [][]int{prompt}, log)
	if err != nil {
		return err
	}
	params := samplingParams(fs, f, m.gen)
	opt := modelrun.GenerateOptions{MaxTokens: f.maxTokens, Sample: params, PrefillChunk: f.prefillChunk}
	if !f.ignoreEOS {
		opt.StopIDs = m.gen.EOS
	}
	start := time.Now()
	var ids []int
	var finish modelrun.Finish
	err = m.run(func(rank int, rm modelrun.Model) error {
		var got []int
		var why modelrun.Finish
		var err error
		// Rank 0 times the first token (the prefill) and the second (the first decode step, which a GPU
		// backend records as a CUDA graph) as start-up phases.
		var emit func(int) error
		if rank == 0 {
			n, last := 0, start
			emit = func(int) error {
				switch n++; n {
				case 1:
					m.firstStep(start, fmt.Sprintf("prefill of %d tokens and the first token", len(prompt)))
				case 2:
					m.phases.Since(phase.Graph, last, "the first decode step (recorded as a graph where the backend records steps)")
				}
				last = time.Now()
				return nil
			}
		}
		if features != nil {
			ig, ok := rm.(imageGenerator)
			if !ok {
				return fmt.Errorf("%w: the %s model takes no images", modelrun.ErrInput, rm.Config().Info().Family)
			}
			got, why, err = ig.GenerateImages(ctx, prompt, features.patchID, features.rows[0], opt, emit)
		} else {
			got, why, err = rm.Generate(ctx, prompt, opt, emit)
		}
		if rank == 0 {
			ids, finish = got, why
		}
		return err
	})
	if err != nil {
		return err
	}
	m.report(log, stderr)
	if !m.leader {
		return nil // rank 0's process reports
	}
	took := time.Since(start)
	log.Info("generated", zap.Int("prompt-tokens", len(prompt)), zap.Int("new-tokens", len(ids)),
		zap.String("finish", string(finish)), zap.Duration("took", took.Round(time.Microsecond)),
		zap.Float64("tokens-per-second", float64(len(ids))/took.Seconds()))
	out := generateOutput{IDs: ids, FinishReason: string(finish), PromptTokens: len(prompt)}
	if tok != nil {
		out.Text = decodeText(tok, ids)
	}
	return writeGenerated(stdout, f, out) // text.go
}

// samplingParams takes generation_config.json's defaults and overrides them with the flags that were set.
func samplingParams(fs *flag.FlagSet, f generateFlags, gen model.Generation) sample.Params {
	p := sample.Params{Seed: f.seed, TopP: 1}
	if gen.DoSample {
		p.Temperature, p.TopK, p.TopP = gen.Temperature, gen.TopK, gen.TopP
	}
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "temperature":
			p.Temperature = f.temperature
		case "top-k":
			p.TopK = f.topK
		case "top-p":
			p.TopP = f.topP
		}
	})
	return p
}
