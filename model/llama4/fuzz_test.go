package llama4_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4"
)

// FuzzParseConfig feeds config.json files (outside input: any checkpoint directory) to the family
// registry and Llama 4's parser: each is parsed or refused with an error wrapping model.ErrConfig or
// llama4.ErrConfig or model.ErrUnknownArchitecture, never a panic; a parsed configuration reports its Info and validates
// without panicking. Its seeds are the fixtures' config.json files and a few broken ones, run in go test.
func FuzzParseConfig(f *testing.F) {
	paths, err := filepath.Glob(filepath.Join(fixturesDir, "*", "config.json"))
	if err != nil || len(paths) == 0 {
		f.Fatalf("no fixture config.json under %s: %v", fixturesDir, err)
	}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	for _, s := range []string{`{}`, `[]`, `null`, `{"architectures":["Llama4ForCausalLM"]}`, `{"model_type":"llama4_text","num_hidden_layers":-1}`,
		`{"architectures":["Llama4ForConditionalGeneration"],"text_config":null}`, `{"architectures":["Llama4ForCausalLM"],"rope_scaling":{"rope_type":"llama3","factor":0}}`,
		`{"architectures":["Llama4ForCausalLM"],"eos_token_id":[1,"x"]}`, `{"model_type":"llama4_text","no_rope_layers":[1,0],"num_hidden_layers":4}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := model.ParseConfig(data)
		if err != nil {
			if !errors.Is(err, model.ErrConfig) && !errors.Is(err, llama4.ErrConfig) && !errors.Is(err, model.ErrUnknownArchitecture) {
				t.Fatalf("ParseConfig(%q) = %v, want a config error or ErrUnknownArchitecture", data, err)
			}
			return
		}
		_ = cfg.Info()
		_ = cfg.Validate()
	})
}
