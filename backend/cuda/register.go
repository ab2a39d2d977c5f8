package cuda

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"

	"github.com/tpfleet/tpfleet/backend"
)

// The backend registers itself as "cuda": backend.Open("cuda", o) opens GPU o.Device with the settings
// of o.Config (a *Config made by the driver's NewConfig, whose flags are those of Config.AddFlags but
// --cuda-device: the device is o.Device), its devices are counted by DeviceCount, and its TP groups
// join through NCCL (Backend is a backend.DeviceContext).
func init() {
	backend.Register("cuda", backend.Driver{
		Open:       open,
		Devices:    DeviceCount,
		DeviceComm: true,
		NewConfig:  func() backend.FlagConfig { return &flagConfig{} },
	})
}

// flagConfig is the cuda backend's own settings as backend.Options.Config carries them: Config without
// its Device, which comes from backend.Options.Device.
type flagConfig struct{ Config }

// AddFlags binds the fields of Config.AddFlags but Device.
func (c *flagConfig) AddFlags(fs *flag.FlagSet) {
	all := flag.NewFlagSet("cuda", flag.ContinueOnError)
	c.Config.AddFlags(all)
	all.VisitAll(func(f *flag.Flag) {
		if f.Name != "cuda-device" {
			fs.Var(f.Value, f.Name, f.Usage)
		}
	})
}

func open(_ context.Context, o backend.Options) (backend.Ops, error) {
	var cfg Config
	switch c := o.Config.(type) {
	case nil:
	case *flagConfig:
		cfg = c.Config
	case *Config:
		cfg = *c
	default:
		return nil, fmt.Errorf("cuda: backend.Options.Config is a %T, want the cuda driver's", o.Config)
	}
	cfg.Device = o.Device
	b, err := New(cfg)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Capabilities the backend offers through package backend's optional interfaces.
var (
	_ backend.Synchronizer   = (*Backend)(nil)
	_ backend.MemoryReporter = (*Backend)(nil)
	_ backend.Describer      = (*Backend)(nil)
	_ backend.DeviceContext  = (*Backend)(nil)
	_ backend.Profiler       = (*Backend)(nil)
	_ backend.GraphReporter  = (*Backend)(nil)
	_ backend.BandwidthMeter = (*Backend)(nil)
)

// Describe reports the GPU's name and memory, with the architecture, the driver's and libraries'
// versions and whether the kernels came from the cache as details (backend.Describer).
func (b *Backend) Describe() backend.Description {
	i := b.info
	d := backend.Description{Name: i.Device, TotalMemory: i.TotalMemory, Details: map[string]string{
		"arch": i.Arch, "driver": strconv.Itoa(i.DriverVersion), "cublaslt": strconv.Itoa(i.CublasLt), "nvrtc": i.NVRTC,
		"kernel-cache-hit": strconv.FormatBool(i.CacheHit), "kernel-cache": i.KernelCache,
	}}
	if len(i.CacheWarnings) > 0 {
		d.Details["kernel-cache-warnings"] = strings.Join(i.CacheWarnings, "; ")
	}
	return d
}
