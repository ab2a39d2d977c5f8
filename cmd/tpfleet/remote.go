package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// remoteFlags are generate's flags for a coordinator's cluster instead of a local model.
type remoteFlags struct {
	addr  string
	wait  time.Duration
	token string
	tls   tlsFlags
}

// addRemoteFlags adds generate's --addr and --wait to fs.
func addRemoteFlags(fs *flag.FlagSet) *remoteFlags {
	var r remoteFlags
	fs.StringVar(&r.addr, "addr", "", "generate on the coordinator at host:port instead of loading --model here; --model then only names the model (its base name)")
	fs.DurationVar(&r.wait, "wait", 0, "with --addr: wait up to this long for the coordinator to serve (0: do not wait)")
	tokenFlag(fs, &r.token, "with --addr: the API key the coordinator requires")
	r.tls.add(fs)
	return &r
}

// runRemoteGenerate is `tpfleet generate --addr`: the same request and output as the local mode, served
// by a coordinator. The prompt is --ids, or --prompt text that the coordinator encodes with the model's
// tokenizer. Without --json the output streams as it arrives: the text for --prompt, else the ids.
// Sampling flags override the server's generation_config.json defaults as a whole: once one is set, the
// unset ones take their flag defaults (temperature 0, top-k 0, top-p 1).
func runRemoteGenerate(ctx context.Context, fs *flag.FlagSet, f generateFlags, r remoteFlags, stdout, stderr io.Writer) error {
	text, err := textPrompt(fs, f)
	if err != nil {
		return err
	}
	var prompt []int
	if !text {
		if prompt, err = parseIDs(f.ids); err != nil {
			return err
		}
	}
	if f.maxTokens <= 0 {
		return usagef("--max-tokens %d must be positive", f.maxTokens)
	}
	req := client.GenerateRequest{PromptIDs: prompt, Prompt: f.prompt, MaxTokens: f.maxTokens, IgnoreEOS: f.ignoreEOS}
	for _, name := range f.images { // the coordinator processes them (images.go's limits apply)
		st, err := os.Stat(name)
		if err != nil {
			return fmt.Errorf("--image: %w", err)
		}
		if st.Size() > maxImageBytes {
			return fmt.Errorf("--image %s: %d bytes, more than %d", name, st.Size(), maxImageBytes)
		}
		data, err := os.ReadFile(name)
		if err != nil {
			return fmt.Errorf("--image: %w", err)
		}
		req.Images = append(req.Images, data)
	}
	if f.dir != "" {
		req.Model = filepath.Base(filepath.Clean(f.dir))
	}
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "temperature", "top-k", "top-p", "seed":
			req.Sampling = &sample.Params{Temperature: f.temperature, TopK: f.topK, TopP: f.topP, Seed: f.seed}
		}
	})
	if req.Sampling != nil {
		if err := req.Sampling.Validate(); err != nil {
			return usagef("%v", err)
		}
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr

	tc, err := r.tls.clientTLS()
	if err != nil {
		return usagef("%v", err)
	}
	cli, err := client.Dial(r.addr, client.WithTLS(tc), client.WithToken(r.token))
	if err != nil {
		return err
	}
	defer cli.Close()
	if r.wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, r.wait)
		err := cli.WaitReady(wctx, 100*time.Millisecond)
		cancel()
		if err != nil {
			return fmt.Errorf("coordinator at %s: %w", r.addr, err)
		}
	}

	start := time.Now()
	printed := 0
	var emit func([]int, string) error
	switch {
	case f.json:
	case text:
		emit = func(_ []int, s string) error {
			if s == "" {
				return nil
			}
			printed++
			_, err := io.WriteString(stdout, s)
			return err
		}
	default:
		emit = func(ids []int, _ string) error {
			for _, id := range ids {
				sep := " "
				if printed == 0 {
					sep = ""
				}
				if _, err := io.WriteString(stdout, sep+strconv.Itoa(id)); err != nil {
					return err
				}
				printed++
			}
			return nil
		}
	}
	res, err := cli.Generate(ctx, req, emit)
	if printed > 0 {
		if _, werr := fmt.Fprintln(stdout); werr != nil && err == nil {
			err = werr
		}
	}
	if err != nil {
		if st, ok := status.FromError(err); ok && ctx.Err() == nil {
			return fmt.Errorf("coordinator at %s: %s: %s", r.addr, st.Code(), st.Message())
		}
		return err
	}
	took := time.Since(start)
	log.Info("generated", zap.String("addr", r.addr), zap.Int("prompt-tokens", res.PromptTokens), zap.Int("new-tokens", len(res.IDs)),
		zap.String("finish", res.FinishReason), zap.Duration("took", took.Round(time.Microsecond)),
		zap.Float64("tokens-per-second", float64(len(res.IDs))/took.Seconds()))
	if f.json {
		return json.NewEncoder(stdout).Encode(generateOutput{IDs: res.IDs, FinishReason: res.FinishReason, PromptTokens: res.PromptTokens, Text: res.Text})
	}
	if printed == 0 {
		_, err = fmt.Fprintln(stdout)
	}
	return err
}
