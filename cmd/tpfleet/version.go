package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"text/tabwriter"

	"github.com/tpfleet/tpfleet/internal/dl"
)

// versionInfo is what `tpfleet version` reports.
type versionInfo struct {
	// Module and Version are the main module's path and version: a tag or pseudo-version when built by
	// `go install module@version`, "(devel)" for a build of a checkout.
	Module  string `json:"module"`
	Version string `json:"version"`
	// Commit, CommitTime and Modified are the VCS stamp of a checkout's build (go build's -buildvcs);
	// empty when the build has none (go run, go test, a build outside a checkout).
	Commit     string `json:"commit,omitempty"`
	CommitTime string `json:"commit_time,omitempty"`
	Modified   bool   `json:"modified,omitempty"`
	GoVersion  string `json:"go_version"`
	Platform   string `json:"platform"`
	CGO        bool   `json:"cgo"`
	// Libraries are the CUDA and NCCL libraries the GPU backend dlopens, as found on this host.
	Libraries []libraryInfo `json:"libraries"`
}

// libraryInfo is one run-time library: where it loaded from, or why it did not.
type libraryInfo struct {
	Name  string `json:"name"`
	Path  string `json:"path,omitempty"`
	Error string `json:"error,omitempty"`
}

// runtimeLibraries are the libraries the cuda backend and the NCCL communicator dlopen (their sonames,
// newest first), in the order they are needed.
var runtimeLibraries = []struct {
	name    string
	sonames []string
}{
	{"CUDA driver", []string{"libcuda.so.1"}},
	{"cuBLASLt", []string{"libcublasLt.so.13", "libcublasLt.so.12"}},
	{"NVRTC", []string{"libnvrtc.so.13", "libnvrtc.so.12"}},
	{"NCCL", []string{"libnccl.so.2"}},
}

// errNotFound is the sentinel of the library lookups of version (dl.LoadError wraps it).
var errNotFound = errors.New("not found")

// runVersion prints the build's version, commit, Go version and the GPU libraries found on this host.
// A host without them is no error: the binary runs on the CPU there.
//
//	tpfleet version [--json]
func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	v := buildVersion()
	v.Libraries = findLibraries(dl.SearchDirs(nil))
	if *asJSON {
		return json.NewEncoder(stdout).Encode(v)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "tpfleet\t%s\n", v.Version)
	fmt.Fprintf(tw, "module\t%s\n", v.Module)
	if v.Commit != "" {
		dirty := ""
		if v.Modified {
			dirty = " (modified)"
		}
		fmt.Fprintf(tw, "commit\t%s%s %s\n", v.Commit, dirty, v.CommitTime)
	} else {
		fmt.Fprintf(tw, "commit\tunknown (no VCS stamp in this build)\n")
	}
	fmt.Fprintf(tw, "go\t%s %s cgo=%v\n", v.GoVersion, v.Platform, v.CGO)
	for _, l := range v.Libraries {
		if l.Path != "" {
			fmt.Fprintf(tw, "%s\t%s\n", l.Name, l.Path)
		} else {
			fmt.Fprintf(tw, "%s\tnot found\n", l.Name)
		}
	}
	return tw.Flush()
}

// buildVersion reads the binary's build information (debug.ReadBuildInfo).
func buildVersion() versionInfo {
	v := versionInfo{Module: "github.com/tpfleet/tpfleet", Version: "(devel)", GoVersion: runtime.Version(),
		Platform: runtime.GOOS + "/" + runtime.GOARCH}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if bi.Main.Path != "" {
		v.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		v.Version = bi.Main.Version
	}
	v.GoVersion = bi.GoVersion
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.time":
			v.CommitTime = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		case "CGO_ENABLED":
			v.CGO = s.Value == "1"
		}
	}
	return v
}

// findLibraries dlopens each runtime library through package dl's search (dirs, then the bare
// soname); a library that is missing is reported, not an error.
func findLibraries(dirs []string) []libraryInfo {
	out := make([]libraryInfo, 0, len(runtimeLibraries))
	for _, l := range runtimeLibraries {
		li := libraryInfo{Name: l.name}
		lib, err := dl.Open(l.sonames, dirs, errNotFound)
		if err != nil {
			li.Error = err.Error()
		} else {
			li.Path = lib.Path
		}
		out = append(out, li)
	}
	return out
}
