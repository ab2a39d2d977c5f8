package kernels

import (
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"slices"
	"strings"
)

//go:embed prelude.cuh *.cu
var files embed.FS

// Prelude is the file every compilation unit starts with.
const Prelude = "prelude.cuh"

// Files returns the names of the kernel source files (*.cu), sorted.
func Files() []string {
	names, err := fs.Glob(files, "*.cu")
	if err != nil { // only for a malformed pattern
		panic(err)
	}
	slices.Sort(names)
	return names
}

// File returns the contents of one embedded file (a *.cu or the prelude).
func File(name string) (string, error) {
	b, err := files.ReadFile(name)
	if err != nil {
		return "", fmt.Errorf("kernels: %w", err)
	}
	return string(b), nil
}

// Source returns the single compilation unit the backend compiles: the prelude followed by every
// *.cu file in name order, each preceded by a #line directive so that compiler messages name the
// original file and line.
func Source() string {
	var sb strings.Builder
	for _, name := range append([]string{Prelude}, Files()...) {
		b, err := files.ReadFile(name)
		if err != nil { // embedded files are always readable
			panic(err)
		}
		fmt.Fprintf(&sb, "#line 1 %q\n", name)
		sb.Write(b)
		if len(b) > 0 && b[len(b)-1] != '\n' {
			sb.WriteByte('\n')
		}
	}
	return sb.String()
}

var entryRE = regexp.MustCompile(`extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(`)

// Entries returns the names of the extern "C" __global__ functions in src, in order of appearance.
func Entries(src string) []string {
	var names []string
	for _, m := range entryRE.FindAllStringSubmatch(src, -1) {
		names = append(names, m[1])
	}
	return names
}
