package kernels

import (
	"fmt"
	"regexp"
	"strings"
)

// Kind is what a kernel parameter takes, as far as a launch is concerned: the driver copies each
// argument by the parameter's size, so a launch with an argument of another kind (or one argument too
// many or too few) shifts or truncates what the kernel reads, with no error from the driver.
type Kind int

const (
	KindOther   Kind = iota // a type the launcher cannot pass (a struct by value)
	KindPointer             // any T*
	KindInt32               // int, unsigned, int32_t, uint32_t
	KindInt64               // long long, unsigned long long, size_t, int64_t, uint64_t
	KindFloat32             // float
	KindBool                // bool
)

func (k Kind) String() string {
	switch k {
	case KindPointer:
		return "pointer"
	case KindInt32:
		return "int32"
	case KindInt64:
		return "int64"
	case KindFloat32:
		return "float32"
	case KindBool:
		return "bool"
	}
	return "other"
}

// Param is one parameter of a kernel: its C type and name as written (object-like macros expanded) and
// its Kind.
type Param struct {
	Type, Name string
	Kind       Kind
}

func (p Param) String() string { return strings.TrimSpace(p.Type + " " + p.Name) }

var (
	defineRE  = regexp.MustCompile(`(?m)^[ \t]*#[ \t]*define[ \t]+([A-Za-z_][A-Za-z0-9_]*)([ \t][^\n]*)?$`)
	commentRE = regexp.MustCompile(`(?s)/\*.*?\*/|//[^\n]*`)
	identRE   = regexp.MustCompile(`[A-Za-z_][A-Za-z0-9_]*`)
)

// Signatures returns the parameters of every extern "C" __global__ function in src (a compilation
// unit's source, as Unit.Source), by name. A parameter list may use object-like macros of src (a list
// shared by several kernels is often one); they are expanded. It fails on a list it cannot split.
func Signatures(src string) (map[string][]Param, error) {
	macros := objectMacros(src)
	sigs := map[string][]Param{}
	for _, m := range entryRE.FindAllStringSubmatchIndex(src, -1) {
		name := src[m[2]:m[3]]
		list, ok := parenthesised(src[m[1]:])
		if !ok {
			return nil, fmt.Errorf("kernels: %s: no closing parenthesis of its parameter list", name)
		}
		params, err := parseParams(expand(commentRE.ReplaceAllString(list, " "), macros, 0))
		if err != nil {
			return nil, fmt.Errorf("kernels: %s: %w", name, err)
		}
		sigs[name] = params
	}
	return sigs, nil
}

// objectMacros returns src's object-like #defines (continuation lines joined); a function-like macro
// (a parenthesis right after the name) is left out.
func objectMacros(src string) map[string]string {
	src = strings.ReplaceAll(src, "\\\r\n", " ")
	src = strings.ReplaceAll(src, "\\\n", " ")
	macros := map[string]string{}
	for _, m := range defineRE.FindAllStringSubmatch(src, -1) {
		if strings.HasPrefix(m[2], "(") {
			continue
		}
		macros[m[1]] = commentRE.ReplaceAllString(m[2], " ")
	}
	return macros
}

// expand replaces the identifiers of s that are macros by their bodies, recursively (a few levels: the
// kernels' parameter macros do not nest deeper).
func expand(s string, macros map[string]string, depth int) string {
	if depth > 8 {
		return s
	}
	return identRE.ReplaceAllStringFunc(s, func(id string) string {
		if body, ok := macros[id]; ok {
			return expand(body, macros, depth+1)
		}
		return id
	})
}

// parenthesised returns the text between s's first '(' (s starts right after it) and its matching ')'.
func parenthesised(s string) (string, bool) {
	depth := 1
	for i, c := range s {
		switch c {
		case '(':
			depth++
		case ')':
			if depth--; depth == 0 {
				return s[:i], true
			}
		}
	}
	return "", false
}

// parseParams splits a parameter list ("const float* x, int n") into its parameters.
func parseParams(list string) ([]Param, error) {
	list = strings.TrimSpace(list)
	if list == "" || list == "void" {
		return []Param{}, nil // no parameters, which a launch checks too (nil would be "not known")
	}
	var params []Param
	for i, p := range strings.Split(list, ",") {
		f := strings.Fields(strings.ReplaceAll(p, "*", " * "))
		if len(f) < 2 || f[len(f)-1] == "*" || !identRE.MatchString(f[len(f)-1]) {
			return nil, fmt.Errorf("parameter %d %q: want a type and a name", i, strings.TrimSpace(p))
		}
		typ := strings.ReplaceAll(strings.Join(f[:len(f)-1], " "), " *", "*")
		params = append(params, Param{Type: typ, Name: f[len(f)-1], Kind: kindOf(f[:len(f)-1])})
	}
	return params, nil
}

// kindOf classifies a parameter's type words (qualifiers included).
func kindOf(words []string) Kind {
	var base []string
	for _, w := range words {
		switch w {
		case "*":
			return KindPointer
		case "const", "volatile", "__restrict__", "__restrict", "signed":
		default:
			base = append(base, w)
		}
	}
	switch strings.Join(base, " ") {
	case "int", "unsigned", "unsigned int", "int32_t", "uint32_t", "u32":
		return KindInt32
	case "long long", "long long int", "unsigned long long", "size_t", "int64_t", "uint64_t":
		return KindInt64
	case "float":
		return KindFloat32
	case "bool":
		return KindBool
	}
	return KindOther
}
