package shard

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors, tested with errors.Is. Every error the package returns wraps one of them.
var (
	// ErrPlan means a plan is malformed: not a JSON object of strings, an empty or badly formed pattern, a
	// pattern given twice.
	ErrPlan = errors.New("shard: invalid plan")
	// ErrUnknownStyle means a plan names a style this package does not know.
	ErrUnknownStyle = errors.New("shard: unknown style")
	// ErrNoMatch means a plan pattern matches no tensor and no module above one, neither in the checkpoint
	// nor in the Llama 4 architecture.
	ErrNoMatch = errors.New("shard: no tensor matches pattern")
	// ErrIndivisible means a split does not divide a dimension into whole units (heads, experts,
	// intermediate columns, vocabulary rows) for the TP size.
	ErrIndivisible = errors.New("shard: not divisible by the TP size")
	// ErrUnsupported means a style splits a tensor in a way the model cannot run (a split on a dimension
	// its TensorSpec does not list, a norm split at all, a packed tensor split without packing).
	ErrUnsupported = errors.New("shard: split not supported by the model")
	// ErrInconsistent means tensors that work together are split in ways that do not fit each other
	// (attention inputs split by heads without the output projection).
	ErrInconsistent = errors.New("shard: inconsistent split")
	// ErrRank means a TP size below 1 or a rank outside [0, tp).
	ErrRank = errors.New("shard: invalid TP size or rank")
)

// TensorError reports a tensor, or a group of tensors of one layer, that a plan cannot split as asked. Layer
// numbers in Tensor are written "*", so one error stands for every layer with the same problem.
type TensorError struct {
	Tensor  string // checkpoint name with layer numbers as "*", or a module for a group
	Style   Style  // the style that applied; empty when none did
	Pattern string // the plan pattern that gave Style; empty when none did
	Reason  string // what is wrong, in words
	Err     error  // the sentinel: ErrIndivisible, ErrUnsupported or ErrInconsistent
}

func (e *TensorError) Error() string {
	var b strings.Builder
	b.WriteString("shard: ")
	b.WriteString(e.Tensor)
	if e.Style != "" {
		fmt.Fprintf(&b, " (%s from pattern %q)", e.Style, e.Pattern)
	}
	b.WriteString(": ")
	b.WriteString(e.Reason)
	return b.String()
}

func (e *TensorError) Unwrap() error { return e.Err }

// Errors is several independent problems found in one pass, so that a user sees all of them at once. Its
// message puts them on one line, separated by "; ".
type Errors []error

func (e Errors) Error() string {
	s := make([]string, len(e))
	for i, err := range e {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

// Unwrap gives errors.Is and errors.As each problem.
func (e Errors) Unwrap() []error { return e }

// errorSet collects errors, dropping repeats of the same message (the same problem in another layer).
type errorSet struct {
	errs []error
	seen map[string]bool
}

func (s *errorSet) add(err error) {
	if s.seen == nil {
		s.seen = make(map[string]bool)
	}
	if msg := err.Error(); !s.seen[msg] {
		s.seen[msg] = true
		s.errs = append(s.errs, err)
	}
}

func (s *errorSet) err() error {
	switch len(s.errs) {
	case 0:
		return nil
	case 1:
		return s.errs[0]
	}
	return Errors(s.errs)
}
