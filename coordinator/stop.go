package coordinator

import (
	"strings"

	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// stopText finds a request's stop strings in its decoded text as vLLM's detokenizer does
// (StopChecker.check_stop_strings), one token's text at a time, and holds back from a stream the text
// that could still become a stop string.
//
// vLLM's rule, which this reproduces: after each token's text is appended, the stop strings are tried in
// the request's order, each searched from where an occurrence could first overlap the new text; the
// first one found ends the generation (not necessarily the earliest in the text). The text is cut
// before it, or after it with include_stop_str_in_output. Matching is on bytes of whole UTF-8
// characters, which finds what vLLM's search on characters finds.
//
// Held back: vLLM holds the last max(len(stop))-1 characters of a stream; this holds only the longest
// tail of the text that begins some stop string, so text that cannot become one is sent at once. The
// text a stream sends in all is the same.
type stopText struct {
	stops   []string
	include bool
	text    string // the output text so far, cut at the stop string once one is found
	sent    int    // bytes of text handed out by next
	hit     string // the stop string found; "" until then
}

// add appends the text of one new token; it reports whether that completes a stop string, after which
// the text is cut and add must not be called again.
func (s *stopText) add(piece string) bool {
	s.text += piece
	if piece == "" {
		return false
	}
	for _, stop := range s.stops {
		from := max(0, len(s.text)-len(piece)-len(stop)+1)
		i := strings.Index(s.text[from:], stop)
		if i < 0 {
			continue
		}
		end := from + i
		if s.include {
			end += len(stop)
		}
		s.text, s.hit = s.text[:end], stop
		return true
	}
	return false
}

// next returns the text not handed out yet that no stop string can still claim: all of it when final
// or once a stop string was found.
func (s *stopText) next(final bool) string {
	end := len(s.text)
	if !final && s.hit == "" && !s.include {
		end -= s.held()
	}
	if end <= s.sent {
		return ""
	}
	out := s.text[s.sent:end]
	s.sent = end
	return out
}

// held is the length of the longest tail of the unsent text that is a proper prefix of a stop string.
func (s *stopText) held() int {
	tail := s.text[s.sent:]
	best := 0
	for _, stop := range s.stops {
		for k := min(len(stop)-1, len(tail)); k > best; k-- {
			if strings.HasSuffix(tail, stop[:k]) {
				best = k
				break
			}
		}
	}
	return best
}

// output turns a request's chosen ids into what its client reads: the ids, their text (whole
// characters, special tokens left out) and the end a stop string makes. Without a tokenizer it passes
// the ids through with no text (a request with stop strings needs one: newRequest checks that).
type output struct {
	text *textStream // nil without a tokenizer
	stop stopText
	// n counts the ids added; stop strings are looked for only once n passes minTokens, as vLLM's
	// detokenizer does.
	n, minTokens int
}

func (c *Coordinator) newOutput(r *request) *output {
	o := &output{stop: stopText{stops: r.stopStrings, include: r.includeStop}, minTokens: r.minTokens}
	if c.model.tok != nil {
		o.text = &textStream{dec: c.model.tok.NewDecoder(true), log: c.log}
	}
	return o
}

// add takes the ids chosen since the last call and their logprobs (none, or one per id; last: the
// request ended) and returns the ids and logprobs to send, the text to send and, when a stop string
// ended the generation, that string: ids then end with the token that completed it and the ids after
// it are dropped.
func (o *output) add(ids []int32, lps []*pb.ChosenLogprobs, last bool) ([]int32, []*pb.ChosenLogprobs, string, string) {
	if o.text == nil {
		return ids, lps, "", ""
	}
	if o.stop.hit != "" {
		return nil, nil, "", o.stop.hit
	}
	for i, id := range ids {
		o.n++
		piece := o.text.add([]int32{id}, false)
		if o.n <= o.minTokens {
			o.stop.text += piece // not searched yet: a stop string must end after min_tokens
			continue
		}
		if o.stop.add(piece) {
			return ids[:i+1], lps[:min(i+1, len(lps))], o.stop.next(true), o.stop.hit
		}
	}
	if last && o.stop.add(o.text.add(nil, true)) {
		return ids, lps, o.stop.next(true), o.stop.hit
	}
	return ids, lps, o.stop.next(last), ""
}
