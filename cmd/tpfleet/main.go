// Command tpfleet serves Llama 4 across GPUs and hosts. This build has the developer tools that run a model
// in one process: generate and score.
//
//	tpfleet generate --model DIR --ids 1,2,3 --max-tokens N [--temperature T] [--json]
//	tpfleet score --model DIR (--ids 1,2,3 | --ids-file F.safetensors) --out OUT.safetensors
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	// Model families register themselves with package model; this binary serves Llama 4.
	_ "github.com/tpfleet/tpfleet/model/llama4"
)

// errUsage marks command-line mistakes: they exit with status 2 after the one-line message.
var errUsage = errors.New("usage")

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"serve", "serve a model on this machine: embedded etcd, a coordinator and local workers", runServe},
		{"coordinator", "run a coordinator: plan the workers in etcd into TP groups, serve clients", runCoordinator},
		{"gateway", "serve the OpenAI HTTP API in a process of its own, over the coordinators (--coordinators)", runGateway},
		{"launch", "start workers like torchrun (--nproc-per-node, --standalone, ...)", runLaunch},
		{"etcd", "run a single-member etcd for a cluster's state (tests, small setups)", runEtcd},
		{"rebalance", "ask the coordinator for a new plan epoch (optionally another --tp)", runRebalance},
		{"cluster", "read the cluster's state from etcd (cluster members, cluster shards)", runCluster},
		{"generate", "generate from token ids or text with a local model or a coordinator (--addr)", runGenerate},
		{"score", "write the logits of token ids under a local model to a safetensors file", runScore},
		{"worker", "run a worker: register in etcd, load this rank's shards, serve steps", runWorker},
		{"tokenize", "encode text or a chat, or decode ids, with a checkpoint tokenizer", runTokenize},
		{"shards", "print how a tp_plan splits a checkpoint across ranks (shards plan)", runShards},
		{"bench", "time prefill and decode of a random model, or with --addr load a running server (TTFT, ITL, tokens/s)", runBench},
		{"warmup", "compile the GPU kernels into the kernel cache and exit (for images and init containers); needs no model", runWarmup},
		{"version", "print the version, commit, Go version and the GPU libraries found", runVersion},
		{"certs", "make a development CA and the cluster's certificates (roles), and a gossip key", runCerts},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches a subcommand and turns its error into one line on stderr and an exit status. Help that
// was asked for (help, -h, --help, `tpfleet help CMD [SUB]`) goes to stdout; usage after a mistake goes
// to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	switch {
	case len(args) == 0:
		usage(stderr)
		return 2
	case args[0] == "help" && len(args) > 1: // tpfleet help CMD [SUB]: CMD [SUB] -h
		args = append(append([]string(nil), args[1:]...), "-h")
	case args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help":
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		errOut := stderr
		if wantsHelp(args[1:]) {
			errOut = stdout
		}
		err := c.run(ctx, args[1:], stdout, errOut)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "tpfleet %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(stderr, "tpfleet %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "tpfleet: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

// wantsHelp reports whether a command's arguments ask for its help: -h, -help or --help before any
// "--", or help as a subcommand.
func wantsHelp(args []string) bool {
	for i, a := range args {
		switch {
		case a == "--":
			return false
		case a == "-h" || a == "-help" || a == "--help" || (i == 0 && a == "help"):
			return true
		}
	}
	return false
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: tpfleet <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'tpfleet help <command>' or 'tpfleet <command> -h' for a command's flags.")
}

// runSubcommand dispatches `tpfleet <parent> <sub> ...` to one of subs, with its own usage text.
func runSubcommand(ctx context.Context, parent, flagsHint string, subs []command, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, "usage: tpfleet %s <subcommand> %s\n\nsubcommands:\n", parent, flagsHint)
		for _, c := range subs {
			fmt.Fprintf(stderr, "  %-10s %s\n", c.name, c.summary)
		}
		fmt.Fprintf(stderr, "\nRun 'tpfleet %s <subcommand> -h' for its flags.\n", parent)
		if len(args) == 0 {
			return usagef("a subcommand is required")
		}
		return flag.ErrHelp
	}
	names := make([]string, len(subs))
	for i, c := range subs {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdout, stderr)
		}
		names[i] = c.name
	}
	return usagef("unknown subcommand %q (want: %s)", args[0], strings.Join(names, ", "))
}

// usagef makes a usage error.
func usagef(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}
