package tinybpe

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
)

// Options shape the generated files.
type Options struct {
	// VocabSize is the size of the BPE vocabulary: 256 byte tokens plus learned merges. Zero means
	// [TinyVocabSize].
	VocabSize int
	// SpecialBase is the id of the first special token; the others follow in order. Zero means right
	// after the BPE vocabulary. Llama 4 uses 200000.
	SpecialBase int
	// Specials are the special tokens in id order. Nil means [TinySpecials].
	Specials []string
	// MergesAsStrings writes merges as "a b" strings (older tokenizers) instead of ["a", "b"] pairs.
	MergesAsStrings bool
	// ChatTemplate is tokenizer_config.json's chat_template; empty leaves the key out.
	ChatTemplate string
	// BOS, EOS and Pad name tokenizer_config.json's bos_token, eos_token and pad_token; empty leaves the
	// key out.
	BOS, EOS, Pad string
}

// TinyVocabSize is the BPE vocabulary of the tiny tokenizer: with the 22 [TinySpecials] right after it,
// every id lies below 512, the vocab_size of the test model fixtures.
const TinyVocabSize = 490

// TinySpecials are 22 of Llama 4's special tokens, in Llama 4's order.
var TinySpecials = []string{
	"<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
	"<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
	"<|text_post_train_reserved_special_token_0|>", "<|text_post_train_reserved_special_token_1|>",
	"<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
	"<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
	"<|image|>", "<|patch|>", "<|vision_reserved_special_token_0|>",
}

// TinyOptions are the options of the committed tiny tokenizer (tokenizer/testdata/tiny and
// testdata/tokenizer).
func TinyOptions() Options {
	return Options{
		ChatTemplate: Llama4ChatTemplate,
		BOS:          "<|begin_of_text|>",
		EOS:          "<|eot|>",
		Pad:          "<|finetune_right_pad|>",
	}
}

// Llama4Specials returns Llama 4's 1134 special tokens in id order from 200000 (llama4-spec §5.4).
func Llama4Specials() []string {
	s := []string{
		"<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
		"<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
	}
	for i := range 6 {
		s = append(s, fmt.Sprintf("<|text_post_train_reserved_special_token_%d|>", i))
	}
	s = append(s, "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>")
	for i := 8; i <= 68; i++ {
		s = append(s, fmt.Sprintf("<|text_post_train_reserved_special_token_%d|>", i))
	}
	s = append(s, "<|image_start|>", "<|image_end|>",
		"<|vision_reserved_special_token_0|>", "<|vision_reserved_special_token_1|>",
		"<|tile_x_separator|>", "<|tile_y_separator|>")
	for i := 2; i <= 5; i++ {
		s = append(s, fmt.Sprintf("<|vision_reserved_special_token_%d|>", i))
	}
	s = append(s, "<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>")
	for i := 7; i <= 1047; i++ {
		s = append(s, fmt.Sprintf("<|vision_reserved_special_token_%d|>", i))
	}
	return s
}

// Build trains on [Corpus] and returns tokenizer.json and tokenizer_config.json in the layout Llama 4
// ships them (see llama4-spec §5.4).
func Build(o Options) (tokenizerJSON, configJSON []byte, err error) {
	if o.VocabSize == 0 {
		o.VocabSize = TinyVocabSize
	}
	if o.Specials == nil {
		o.Specials = TinySpecials
	}
	vocab, merges, err := Train(Corpus, Llama4Pattern, o.VocabSize)
	if err != nil {
		return nil, nil, err
	}
	if len(vocab) != o.VocabSize {
		return nil, nil, fmt.Errorf("tinybpe: corpus yields %d tokens, want %d", len(vocab), o.VocabSize)
	}
	base := o.SpecialBase
	if base == 0 {
		base = len(vocab)
	}
	if base < len(vocab) {
		return nil, nil, fmt.Errorf("tinybpe: special tokens at %d overlap the vocabulary of %d", base, len(vocab))
	}

	added := make([]addedToken, len(o.Specials))
	for i, s := range o.Specials {
		added[i] = addedToken{ID: base + i, Content: s, Special: true}
	}
	var mergesJSON any
	if o.MergesAsStrings {
		ss := make([]string, len(merges))
		for i, m := range merges {
			ss[i] = m[0] + " " + m[1]
		}
		mergesJSON = ss
	} else {
		mergesJSON = merges
	}
	bos := "<|begin_of_text|>"
	bosID := base
	tj := tokenizerFile{
		Version:     "1.0",
		AddedTokens: added,
		PreTokenizer: ordered{
			{"type", "Sequence"},
			{"pretokenizers", []any{
				ordered{{"type", "Split"}, {"pattern", map[string]string{"Regex": Llama4Pattern}}, {"behavior", "Isolated"}, {"invert", false}},
				ordered{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}},
			}},
		},
		PostProcessor: ordered{
			{"type", "Sequence"},
			{"processors", []any{
				ordered{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
				ordered{
					{"type", "TemplateProcessing"},
					{"single", []any{
						map[string]any{"SpecialToken": ordered{{"id", bos}, {"type_id", 0}}},
						map[string]any{"Sequence": ordered{{"id", "A"}, {"type_id", 0}}},
					}},
					{"pair", []any{
						map[string]any{"SpecialToken": ordered{{"id", bos}, {"type_id", 0}}},
						map[string]any{"Sequence": ordered{{"id", "A"}, {"type_id", 0}}},
						map[string]any{"SpecialToken": ordered{{"id", bos}, {"type_id", 1}}},
						map[string]any{"Sequence": ordered{{"id", "B"}, {"type_id", 1}}},
					}},
					{"special_tokens", map[string]any{
						bos: ordered{{"id", bos}, {"ids", []int{bosID}}, {"tokens", []string{bos}}},
					}},
				},
			}},
		},
		Decoder: ordered{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}},
		Model: ordered{
			{"type", "BPE"}, {"dropout", nil}, {"unk_token", nil}, {"continuing_subword_prefix", nil},
			{"end_of_word_suffix", nil}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", true},
			{"vocab", vocabJSON(vocab)}, {"merges", mergesJSON},
		},
	}
	tokenizerJSON, err = marshal(tj)
	if err != nil {
		return nil, nil, err
	}

	decoder := make(ordered, len(added))
	for i, a := range added {
		decoder[i] = field{strconv.Itoa(a.ID), ordered{
			{"content", a.Content}, {"lstrip", false}, {"normalized", false}, {"rstrip", false},
			{"single_word", false}, {"special", true},
		}}
	}
	cfg := ordered{{"added_tokens_decoder", decoder}}
	if o.BOS != "" {
		cfg = append(cfg, field{"bos_token", o.BOS})
	}
	if o.ChatTemplate != "" {
		cfg = append(cfg, field{"chat_template", o.ChatTemplate})
	}
	cfg = append(cfg, field{"clean_up_tokenization_spaces", false})
	if o.EOS != "" {
		cfg = append(cfg, field{"eos_token", o.EOS})
	}
	cfg = append(cfg, field{"extra_special_tokens", map[string]string{}},
		field{"model_input_names", []string{"input_ids", "attention_mask"}},
		field{"model_max_length", 10485760})
	if o.Pad != "" {
		cfg = append(cfg, field{"pad_token", o.Pad})
	}
	cfg = append(cfg, field{"tokenizer_class", "PreTrainedTokenizerFast"})
	configJSON, err = marshal(cfg)
	if err != nil {
		return nil, nil, err
	}
	return tokenizerJSON, configJSON, nil
}

type tokenizerFile struct {
	Version       string       `json:"version"`
	Truncation    any          `json:"truncation"`
	Padding       any          `json:"padding"`
	AddedTokens   []addedToken `json:"added_tokens"`
	Normalizer    any          `json:"normalizer"`
	PreTokenizer  any          `json:"pre_tokenizer"`
	PostProcessor any          `json:"post_processor"`
	Decoder       any          `json:"decoder"`
	Model         any          `json:"model"`
}

type addedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

// field and ordered write JSON objects with their keys in the given order.
type field struct {
	key string
	val any
}

type ordered []field

func (o ordered) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, f := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, err := marshalCompact(f.key)
		if err != nil {
			return nil, err
		}
		v, err := marshalCompact(f.val)
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func vocabJSON(vocab []string) ordered {
	o := make(ordered, len(vocab))
	for id, s := range vocab {
		o[id] = field{s, id}
	}
	return o
}

func marshalCompact(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("tinybpe: %w", err)
	}
	return b.Bytes(), nil
}
