package coordinator

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/tpfleet/tpfleet/model"
)

// generationConfig returns the generation defaults that --generation-config chooses for m (see
// Config.GenerationConfig).
func generationConfig(choice string, m modelInfo) (model.Generation, error) {
	switch choice {
	case "", "auto":
		return m.gen, nil
	case "vllm":
		g := m.gen
		g.DoSample, g.Temperature, g.TopK, g.TopP = true, 1, 0, 1
		return g, nil
	}
	if st, err := os.Stat(filepath.Join(choice, "generation_config.json")); err != nil || st.IsDir() {
		return model.Generation{}, fmt.Errorf("%w: --generation-config %q: want auto, vllm or a directory with a generation_config.json", ErrInvalidConfig, choice)
	}
	g, err := model.LoadGeneration(choice, m.cfg)
	if err != nil {
		return model.Generation{}, fmt.Errorf("%w: --generation-config: %w", ErrInvalidConfig, err)
	}
	return g, nil
}
