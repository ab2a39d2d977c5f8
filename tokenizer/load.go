package tokenizer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/ardanlabs/jinja"
	"github.com/dlclark/regexp2"
)

// File names read by [Load].
const (
	TokenizerFile    = "tokenizer.json"
	ConfigFile       = "tokenizer_config.json"
	TemplateFile     = "chat_template.jinja"
	TemplateJSONFile = "chat_template.json"
)

// maxID bounds token ids, so a corrupt file cannot make Load allocate without limit. Llama 4 uses ids
// below 202048.
const maxID = 1 << 22

// Load reads the tokenizer in dir: tokenizer.json (required) and, when present, tokenizer_config.json.
// The chat template is taken from chat_template.jinja, else tokenizer_config.json's chat_template, else
// chat_template.json, as transformers does; with none, [Tokenizer.ApplyChatTemplate] writes Llama 4's
// format itself.
//
// Errors are [*FileError] values naming the file; they wrap [ErrUnsupported], [ErrMalformed],
// [ErrChatTemplate] or the I/O error.
func Load(dir string) (*Tokenizer, error) {
	path := filepath.Join(dir, TokenizerFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &FileError{Path: path, Err: err}
	}
	t, err := parseTokenizer(data)
	if err != nil {
		return nil, &FileError{Path: path, Err: err}
	}

	path = filepath.Join(dir, ConfigFile)
	data, err = os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		data = nil
	case err != nil:
		return nil, &FileError{Path: path, Err: err}
	}
	var tmpl string
	if data != nil {
		if tmpl, err = t.applyConfig(data); err != nil {
			return nil, &FileError{Path: path, Err: err}
		}
	}

	if src, err := os.ReadFile(filepath.Join(dir, TemplateFile)); err == nil {
		path, tmpl = filepath.Join(dir, TemplateFile), string(src)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, &FileError{Path: filepath.Join(dir, TemplateFile), Err: err}
	} else if tmpl == "" {
		p := filepath.Join(dir, TemplateJSONFile)
		data, err := os.ReadFile(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return nil, &FileError{Path: p, Err: err}
		default:
			var f struct {
				ChatTemplate json.RawMessage `json:"chat_template"`
			}
			if err := json.Unmarshal(data, &f); err != nil {
				return nil, &FileError{Path: p, Err: fmt.Errorf("%w: %v", ErrMalformed, err)}
			}
			if tmpl, err = chatTemplateField(f.ChatTemplate); err != nil {
				return nil, &FileError{Path: p, Err: err}
			}
			path = p
		}
	}
	if tmpl != "" {
		if err := t.setTemplate(tmpl); err != nil {
			return nil, &FileError{Path: path, Err: err}
		}
	}
	return t, nil
}

// fileJSON is tokenizer.json.
type fileJSON struct {
	Truncation    json.RawMessage `json:"truncation"`
	Padding       json.RawMessage `json:"padding"`
	AddedTokens   []addedJSON     `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Decoder       json.RawMessage `json:"decoder"`
	Model         json.RawMessage `json:"model"`
}

// addedJSON is one added token, in tokenizer.json's added_tokens or tokenizer_config.json's
// added_tokens_decoder (which has no id field).
type addedJSON struct {
	ID         *int   `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type modelJSON struct {
	Type                    string            `json:"type"`
	Dropout                 *float64          `json:"dropout"`
	UnkToken                *string           `json:"unk_token"`
	ContinuingSubwordPrefix *string           `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string           `json:"end_of_word_suffix"`
	ByteFallback            bool              `json:"byte_fallback"`
	IgnoreMerges            bool              `json:"ignore_merges"`
	Vocab                   map[string]int    `json:"vocab"`
	Merges                  []json.RawMessage `json:"merges"`
}

// component is any typed object of tokenizer.json (normalizer, pre-tokenizer, …).
type component struct {
	Type string `json:"type"`
	raw  json.RawMessage
}

func (c *component) UnmarshalJSON(b []byte) error {
	c.raw = append(c.raw[:0], b...)
	var t struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return err
	}
	c.Type = t.Type
	return nil
}

func (c *component) decode(v any) error {
	if err := json.Unmarshal(c.raw, v); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrMalformed, c.Type, err)
	}
	return nil
}

func isNull(raw json.RawMessage) bool {
	s := bytes.TrimSpace(raw)
	return len(s) == 0 || string(s) == "null"
}

// parseTokenizer builds a Tokenizer from tokenizer.json.
func parseTokenizer(data []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if !isNull(f.Truncation) {
		return nil, fmt.Errorf("%w: truncation is set (want null)", ErrUnsupported)
	}
	if !isNull(f.Padding) {
		return nil, fmt.Errorf("%w: padding is set (want null)", ErrUnsupported)
	}
	if err := checkNormalizer(f.Normalizer); err != nil {
		return nil, err
	}
	if isNull(f.Model) {
		return nil, fmt.Errorf("%w: no model", ErrMalformed)
	}
	var m modelJSON
	if err := json.Unmarshal(f.Model, &m); err != nil {
		return nil, fmt.Errorf("%w: model: %v", ErrMalformed, err)
	}
	t, err := newBPE(m)
	if err != nil {
		return nil, err
	}
	for _, a := range f.AddedTokens {
		if a.ID == nil {
			return nil, fmt.Errorf("%w: added token %q has no id", ErrMalformed, a.Content)
		}
		if err := t.addToken(*a.ID, a); err != nil {
			return nil, fmt.Errorf("added_tokens: %w", err)
		}
	}
	if err := t.parsePreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	if err := t.parsePostProcessor(f.PostProcessor); err != nil {
		return nil, err
	}
	if err := checkDecoder(f.Decoder); err != nil {
		return nil, err
	}
	if err := t.finish(); err != nil {
		return nil, err
	}
	return t, nil
}

func checkNormalizer(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("%w: normalizer: %v", ErrMalformed, err)
	}
	if c.Type == "Sequence" {
		var s struct {
			Normalizers []json.RawMessage `json:"normalizers"`
		}
		if err := c.decode(&s); err != nil {
			return err
		}
		for _, n := range s.Normalizers {
			if err := checkNormalizer(n); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("%w: normalizer %q (want none)", ErrUnsupported, c.Type)
}

func checkDecoder(raw json.RawMessage) error {
	if isNull(raw) {
		return fmt.Errorf("%w: no decoder (want ByteLevel)", ErrUnsupported)
	}
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("%w: decoder: %v", ErrMalformed, err)
	}
	if c.Type != "ByteLevel" {
		return fmt.Errorf("%w: decoder %q (want ByteLevel)", ErrUnsupported, c.Type)
	}
	return nil
}

// newBPE checks the model and builds the vocabulary and merge table.
func newBPE(m modelJSON) (*Tokenizer, error) {
	switch {
	case m.Type != "BPE":
		return nil, fmt.Errorf("%w: model type %q (want BPE)", ErrUnsupported, m.Type)
	case m.Dropout != nil && *m.Dropout != 0:
		return nil, fmt.Errorf("%w: BPE dropout %g (want null)", ErrUnsupported, *m.Dropout)
	case m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "":
		return nil, fmt.Errorf("%w: BPE continuing_subword_prefix %q (want null)", ErrUnsupported, *m.ContinuingSubwordPrefix)
	case m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "":
		return nil, fmt.Errorf("%w: BPE end_of_word_suffix %q (want null)", ErrUnsupported, *m.EndOfWordSuffix)
	case m.ByteFallback:
		return nil, fmt.Errorf("%w: BPE byte_fallback (want false)", ErrUnsupported)
	case len(m.Vocab) == 0:
		return nil, fmt.Errorf("%w: BPE model has no vocab", ErrMalformed)
	}
	t := &Tokenizer{
		vocab:        make(map[string]int, len(m.Vocab)),
		rawVocab:     make(map[string]int, len(m.Vocab)),
		addedIDs:     map[string]int{},
		merges:       make(map[uint64]merge, len(m.Merges)),
		ignoreMerges: m.IgnoreMerges,
		bos:          -1,
		cache:        pieceCache{m: map[string][]int{}},
	}
	for s, id := range m.Vocab {
		if id < 0 || id >= maxID {
			return nil, fmt.Errorf("%w: vocab token %q has id %d outside [0, %d)", ErrMalformed, s, id, maxID)
		}
		t.grow(id)
		if t.tokens[id].valid {
			return nil, fmt.Errorf("%w: vocab tokens %q and %q share id %d", ErrMalformed, t.tokens[id].text, s, id)
		}
		b, byteLevel := tokenBytes(s)
		t.tokens[id] = token{text: s, bytes: b, valid: true}
		t.vocab[s] = id
		if byteLevel {
			t.rawVocab[string(b)] = id
		}
	}
	for b := range 256 {
		id, ok := t.vocab[string(byteToRune[b])]
		if !ok {
			return nil, fmt.Errorf("%w: vocab has no token for byte 0x%02x (%q); byte-level BPE needs all 256", ErrMalformed, b, string(byteToRune[b]))
		}
		t.byteIDs[b] = int32(id)
	}
	if m.UnkToken != nil {
		if _, ok := t.vocab[*m.UnkToken]; !ok {
			return nil, fmt.Errorf("%w: unk_token %q is not in the vocab", ErrMalformed, *m.UnkToken)
		}
	}
	for rank, raw := range m.Merges {
		a, b, err := parseMerge(raw)
		if err != nil {
			return nil, fmt.Errorf("%w: merge %d: %v", ErrMalformed, rank, err)
		}
		ida, oka := t.vocab[a]
		idb, okb := t.vocab[b]
		idm, okm := t.vocab[a+b]
		switch {
		case !oka:
			return nil, fmt.Errorf("%w: merge %d (%q %q): %q is not in the vocab", ErrMalformed, rank, a, b, a)
		case !okb:
			return nil, fmt.Errorf("%w: merge %d (%q %q): %q is not in the vocab", ErrMalformed, rank, a, b, b)
		case !okm:
			return nil, fmt.Errorf("%w: merge %d (%q %q): %q is not in the vocab", ErrMalformed, rank, a, b, a+b)
		}
		// As in HF, a repeated pair takes its last rank.
		t.merges[pairKey(int32(ida), int32(idb))] = merge{rank: int32(rank), id: int32(idm)}
	}
	return t, nil
}

// parseMerge reads a merge given as "a b" or as ["a", "b"].
func parseMerge(raw json.RawMessage) (string, string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		a, b, ok := strings.Cut(s, " ")
		if !ok || a == "" || b == "" || strings.Contains(b, " ") {
			return "", "", fmt.Errorf("%q is not two tokens separated by one space", s)
		}
		return a, b, nil
	}
	var p []string
	if err := json.Unmarshal(raw, &p); err != nil || len(p) != 2 {
		return "", "", fmt.Errorf("%s is neither \"a b\" nor [\"a\", \"b\"]", raw)
	}
	if p[0] == "" || p[1] == "" {
		return "", "", fmt.Errorf("%s has an empty token", raw)
	}
	return p[0], p[1], nil
}

// grow makes t.tokens long enough to hold id.
func (t *Tokenizer) grow(id int) {
	if id >= len(t.tokens) {
		t.tokens = append(t.tokens, make([]token, id+1-len(t.tokens))...)
	}
}

// addToken registers an added token at id. A token that is already in the vocabulary must keep its id;
// one that is already added must be the same token.
func (t *Tokenizer) addToken(id int, a addedJSON) error {
	switch {
	case a.Content == "":
		return fmt.Errorf("%w: added token %d has empty content", ErrMalformed, id)
	case id < 0 || id >= maxID:
		return fmt.Errorf("%w: added token %q has id %d outside [0, %d)", ErrMalformed, a.Content, id, maxID)
	}
	if prev, ok := t.addedIDs[a.Content]; ok && prev != id {
		return fmt.Errorf("%w: added token %q has ids %d and %d", ErrMalformed, a.Content, prev, id)
	}
	if vid, ok := t.vocab[a.Content]; ok && vid != id {
		return fmt.Errorf("%w: added token %q has id %d but the vocab gives it %d", ErrMalformed, a.Content, id, vid)
	}
	t.grow(id)
	if old := t.tokens[id]; old.valid && old.text != a.Content {
		return fmt.Errorf("%w: id %d is both %q and added token %q", ErrMalformed, id, old.text, a.Content)
	}
	b, _ := tokenBytes(a.Content)
	t.tokens[id] = token{text: a.Content, bytes: b, valid: true, added: true, special: a.Special,
		lstrip: a.LStrip, rstrip: a.RStrip, singleWord: a.SingleWord}
	t.addedIDs[a.Content] = id
	return nil
}

type splitJSON struct {
	Pattern struct {
		Regex  *string `json:"Regex"`
		String *string `json:"String"`
	} `json:"pattern"`
	Behavior string `json:"behavior"`
	Invert   bool   `json:"invert"`
}

type byteLevelJSON struct {
	AddPrefixSpace bool `json:"add_prefix_space"`
	UseRegex       bool `json:"use_regex"`
}

// parsePreTokenizer accepts zero or more Split(pattern, Isolated) steps followed by one
// ByteLevel(add_prefix_space=false, use_regex=false), bare or in a Sequence: Llama 4's layout.
func (t *Tokenizer) parsePreTokenizer(raw json.RawMessage) error {
	if isNull(raw) {
		return fmt.Errorf("%w: no pre_tokenizer (want Sequence[Split, ByteLevel])", ErrUnsupported)
	}
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("%w: pre_tokenizer: %v", ErrMalformed, err)
	}
	steps := []component{c}
	if c.Type == "Sequence" {
		var s struct {
			PreTokenizers []component `json:"pretokenizers"`
		}
		if err := c.decode(&s); err != nil {
			return err
		}
		steps = s.PreTokenizers
	}
	sawByteLevel := false
	for i, s := range steps {
		if sawByteLevel {
			return fmt.Errorf("%w: pre_tokenizer %q after ByteLevel (ByteLevel must come last)", ErrUnsupported, s.Type)
		}
		switch s.Type {
		case "Split":
			var sp splitJSON
			if err := s.decode(&sp); err != nil {
				return err
			}
			if sp.Behavior != "Isolated" {
				return fmt.Errorf("%w: Split behavior %q (want Isolated)", ErrUnsupported, sp.Behavior)
			}
			if sp.Invert {
				return fmt.Errorf("%w: Split invert=true", ErrUnsupported)
			}
			var pattern string
			switch {
			case sp.Pattern.Regex != nil:
				pattern = *sp.Pattern.Regex
			case sp.Pattern.String != nil:
				pattern = regexp2.Escape(*sp.Pattern.String)
			default:
				return fmt.Errorf("%w: Split %d has no Regex or String pattern", ErrMalformed, i)
			}
			if pattern == "" {
				return fmt.Errorf("%w: Split %d has an empty pattern", ErrMalformed, i)
			}
			re, err := regexp2.Compile(pattern, regexp2.None)
			if err != nil {
				return fmt.Errorf("%w: Split pattern %q: %v", ErrMalformed, pattern, err)
			}
			t.splits = append(t.splits, re)
		case "ByteLevel":
			var bl byteLevelJSON
			if err := s.decode(&bl); err != nil {
				return err
			}
			if bl.AddPrefixSpace {
				return fmt.Errorf("%w: ByteLevel pre-tokenizer with add_prefix_space=true", ErrUnsupported)
			}
			if bl.UseRegex {
				return fmt.Errorf("%w: ByteLevel pre-tokenizer with use_regex=true (Llama 4 splits with its own Split regex)", ErrUnsupported)
			}
			sawByteLevel = true
		default:
			return fmt.Errorf("%w: pre_tokenizer %q (want Split and ByteLevel)", ErrUnsupported, s.Type)
		}
	}
	if !sawByteLevel {
		return fmt.Errorf("%w: pre_tokenizer has no ByteLevel step (byte-level BPE needs one)", ErrUnsupported)
	}
	return nil
}

type templateJSON struct {
	Single        []map[string]templatePiece `json:"single"`
	SpecialTokens map[string]struct {
		IDs []int `json:"ids"`
	} `json:"special_tokens"`
}

type templatePiece struct {
	ID string `json:"id"`
}

// parsePostProcessor accepts no post-processor, ByteLevel (which only moves offsets) and
// TemplateProcessing, bare or in a Sequence. Only the "single" template matters: it gives the ids added
// before and after the text when Encode's addSpecial is set.
func (t *Tokenizer) parsePostProcessor(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("%w: post_processor: %v", ErrMalformed, err)
	}
	steps := []component{c}
	if c.Type == "Sequence" {
		var s struct {
			Processors []component `json:"processors"`
		}
		if err := c.decode(&s); err != nil {
			return err
		}
		steps = s.Processors
	}
	sawTemplate := false
	for _, s := range steps {
		switch s.Type {
		case "ByteLevel":
		case "TemplateProcessing":
			if sawTemplate {
				return fmt.Errorf("%w: two TemplateProcessing post-processors", ErrUnsupported)
			}
			sawTemplate = true
			var tp templateJSON
			if err := s.decode(&tp); err != nil {
				return err
			}
			sawA := false
			for _, item := range tp.Single {
				if p, ok := item["Sequence"]; ok {
					if p.ID != "A" || sawA {
						return fmt.Errorf("%w: TemplateProcessing single has sequence %q (want one $A)", ErrUnsupported, p.ID)
					}
					sawA = true
					continue
				}
				p, ok := item["SpecialToken"]
				if !ok {
					return fmt.Errorf("%w: TemplateProcessing single item %v", ErrMalformed, item)
				}
				st, ok := tp.SpecialTokens[p.ID]
				if !ok || len(st.IDs) == 0 {
					return fmt.Errorf("%w: TemplateProcessing special token %q has no ids", ErrMalformed, p.ID)
				}
				if sawA {
					t.suffix = append(t.suffix, st.IDs...)
				} else {
					t.prefix = append(t.prefix, st.IDs...)
				}
			}
			if !sawA {
				return fmt.Errorf("%w: TemplateProcessing single has no $A", ErrMalformed)
			}
		default:
			return fmt.Errorf("%w: post_processor %q (want TemplateProcessing or ByteLevel)", ErrUnsupported, s.Type)
		}
	}
	return nil
}

// finish checks ids used by the post-processor, builds the added-token matcher and picks a default BOS.
func (t *Tokenizer) finish() error {
	for _, id := range append(append([]int(nil), t.prefix...), t.suffix...) {
		if !t.validID(id) {
			return fmt.Errorf("%w: post_processor uses id %d, which names no token", ErrMalformed, id)
		}
	}
	if len(t.prefix) > 0 {
		t.bos = t.prefix[0]
	}
	contents := make([]string, 0, len(t.addedIDs))
	for s := range t.addedIDs {
		contents = append(contents, s)
	}
	if len(contents) == 0 {
		t.addedRE = nil
		return nil
	}
	// Longest first: Go's leftmost-first alternation then finds the longest token at each position, as
	// HF's leftmost-longest Aho-Corasick does.
	sort.Slice(contents, func(i, j int) bool {
		if len(contents[i]) != len(contents[j]) {
			return len(contents[i]) > len(contents[j])
		}
		return contents[i] < contents[j]
	})
	for i, s := range contents {
		contents[i] = regexp.QuoteMeta(s)
	}
	re, err := regexp.Compile(strings.Join(contents, "|"))
	if err != nil {
		return fmt.Errorf("%w: added tokens: %v", ErrMalformed, err)
	}
	t.addedRE = re
	return nil
}

// configJSON is the part of tokenizer_config.json this package reads.
type configJSON struct {
	AddedTokensDecoder map[string]addedJSON `json:"added_tokens_decoder"`
	BOSToken           json.RawMessage      `json:"bos_token"`
	EOSToken           json.RawMessage      `json:"eos_token"`
	PadToken           json.RawMessage      `json:"pad_token"`
	ChatTemplate       json.RawMessage      `json:"chat_template"`
	CleanUpSpaces      bool                 `json:"clean_up_tokenization_spaces"`
}

// applyConfig reads tokenizer_config.json: added tokens, bos/eos/pad and the chat template source.
func (t *Tokenizer) applyConfig(data []byte) (string, error) {
	var c configJSON
	if err := json.Unmarshal(data, &c); err != nil {
		return "", fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if c.CleanUpSpaces {
		return "", fmt.Errorf("%w: clean_up_tokenization_spaces=true (want false, as Llama 4 ships)", ErrUnsupported)
	}
	ids := make([]int, 0, len(c.AddedTokensDecoder))
	for k := range c.AddedTokensDecoder {
		var id int
		if _, err := fmt.Sscanf(k, "%d", &id); err != nil || fmt.Sprint(id) != k {
			return "", fmt.Errorf("%w: added_tokens_decoder key %q is not an id", ErrMalformed, k)
		}
		ids = append(ids, id)
	}
	sort.Ints(ids)
	changed := false
	for _, id := range ids {
		a := c.AddedTokensDecoder[fmt.Sprint(id)]
		if a.ID != nil && *a.ID != id {
			return "", fmt.Errorf("%w: added_tokens_decoder %d has id %d", ErrMalformed, id, *a.ID)
		}
		if id < len(t.tokens) && t.tokens[id].added {
			if t.tokens[id].text != a.Content {
				return "", fmt.Errorf("%w: added_tokens_decoder %d is %q but tokenizer.json has %q", ErrMalformed, id, a.Content, t.tokens[id].text)
			}
			continue
		}
		if err := t.addToken(id, a); err != nil {
			return "", fmt.Errorf("added_tokens_decoder: %w", err)
		}
		changed = true
	}
	if changed {
		if err := t.finish(); err != nil {
			return "", err
		}
	}

	var err error
	if t.bosToken, err = t.specialField("bos_token", c.BOSToken); err != nil {
		return "", err
	}
	if t.bosToken != "" {
		t.bos, _ = t.TokenID(t.bosToken)
	}
	if t.eosToken, err = t.specialField("eos_token", c.EOSToken); err != nil {
		return "", err
	}
	if t.eosToken != "" {
		id, _ := t.TokenID(t.eosToken)
		t.eos = []int{id}
	}
	if t.padToken, err = t.specialField("pad_token", c.PadToken); err != nil {
		return "", err
	}
	return chatTemplateField(c.ChatTemplate)
}

// specialField reads bos_token and the like: null, a string, or an AddedToken object with "content".
// A named token must exist.
func (t *Tokenizer) specialField(name string, raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		var a addedJSON
		if err := json.Unmarshal(raw, &a); err != nil {
			return "", fmt.Errorf("%w: %s is neither a string nor a token object", ErrMalformed, name)
		}
		s = a.Content
	}
	if _, ok := t.TokenID(s); !ok {
		return "", fmt.Errorf("%w: %s %q is not a token", ErrMalformed, name, s)
	}
	return s, nil
}

// chatTemplateField reads chat_template: null, a string, or a list of {name, template} from which the
// one named "default" is taken.
func chatTemplateField(raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var list []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return "", fmt.Errorf("%w: chat_template is neither a string nor a list of {name, template}", ErrMalformed)
	}
	for _, e := range list {
		if e.Name == "default" {
			return e.Template, nil
		}
	}
	return "", fmt.Errorf("%w: chat_template list has no template named \"default\"", ErrUnsupported)
}

// setTemplate compiles the chat template, its tojson(indent=N) turned into transformers' (see
// rewriteTojsonIndent).
func (t *Tokenizer) setTemplate(src string) error {
	tmpl, err := jinja.Compile(rewriteTojsonIndent(src))
	if err != nil {
		return fmt.Errorf("%w: compile: %v", ErrChatTemplate, err)
	}
	t.template = tmpl
	return nil
}
