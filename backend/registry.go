package backend

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// ErrUnavailable reports a backend that is registered but cannot open on this machine: a library, a
// driver or the requested device is missing. Backends wrap it (with their own sentinel, e.g.
// cuda.ErrUnavailable, in between) and name what is missing, so callers can fall back or report
// without knowing the backend.
var ErrUnavailable = errors.New("backend: unavailable")

// ErrUnknown reports a device name that no backend registered. Its message lists the registered ones.
var ErrUnknown = errors.New("backend: unknown device")

// Options are what Open passes to a backend's Driver.Open. A zero field means the backend's default.
type Options struct {
	// Device is the ordinal of the device among the host's devices of the backend's kind (a GPU as the
	// driver numbers them, after CUDA_VISIBLE_DEVICES; torchrun's LOCAL_RANK). Backends of one device
	// (cpu) ignore it.
	Device int
	// Threads is the number of goroutines of host math (cpu's matrix products); 0 means GOMAXPROCS.
	// Backends that compute elsewhere ignore it.
	Threads int
	// Config is the backend's own settings: a value made by its Driver.NewConfig (bound to flags with
	// its AddFlags), or nil for its defaults. Open fails when it is of another type.
	Config FlagConfig
}

// FlagConfig is a backend's own settings, beyond Options' common fields: AddFlags binds them to flags
// named after the backend ("--cuda-activations"), with the current values as defaults.
type FlagConfig interface {
	AddFlags(fs *flag.FlagSet)
}

// Driver is what a backend registers under its name.
type Driver struct {
	// Open makes the backend's Ops on device o.Device (required). ctx bounds the opening only. When the
	// backend cannot run on this machine the error wraps ErrUnavailable and names what is missing.
	Open func(ctx context.Context, o Options) (Ops, error)
	// Devices counts the devices of this kind that the host has (optional). Nil means the backend runs
	// on the host's cores (one device, shared by threads): callers then size work by threads, not by
	// devices, and start workers in-process.
	Devices func() (int, error)
	// DeviceComm says that the backend's Ops implement DeviceContext, so that a TP group of them joins
	// through a device communicator (NCCL) instead of the TCP ring: what callers check before any Ops is
	// open (the library's presence, say). Once open, the capability itself decides.
	DeviceComm bool
	// NewConfig returns the backend's own settings at their defaults (optional; nil: it has none).
	NewConfig func() FlagConfig
}

var (
	regMu   sync.RWMutex
	drivers = map[string]Driver{}
)

// Register makes a backend available under name, for Open, Lookup and Names. Backends call it from
// their package's init, so a binary offers the backends it imports (for their side effect only).
// Register panics when name is empty, already registered or d.Open is nil: a programming error.
func Register(name string, d Driver) {
	regMu.Lock()
	defer regMu.Unlock()
	switch _, dup := drivers[name]; {
	case name == "":
		panic("backend: Register with an empty name")
	case dup:
		panic("backend: Register called twice for " + name)
	case d.Open == nil:
		panic("backend: Register " + name + " without Open")
	}
	drivers[name] = d
}

// Names returns the registered backends' names, sorted.
func Names() []string {
	regMu.RLock()
	defer regMu.RUnlock()
	names := make([]string, 0, len(drivers))
	for n := range drivers {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Lookup returns the Driver registered under name, or an error wrapping ErrUnknown that lists the
// registered names.
func Lookup(name string) (Driver, error) {
	regMu.RLock()
	d, ok := drivers[name]
	regMu.RUnlock()
	if !ok {
		return Driver{}, fmt.Errorf("%w %q: want %s", ErrUnknown, name, strings.Join(Names(), " or "))
	}
	return d, nil
}

// Open opens the backend registered under name. An unknown name is an error wrapping ErrUnknown that
// lists the registered ones; a backend that cannot run here returns its error, wrapping ErrUnavailable.
func Open(ctx context.Context, name string, o Options) (Ops, error) {
	d, err := Lookup(name)
	if err != nil {
		return nil, err
	}
	return d.Open(ctx, o)
}

// DeviceCount counts the host's devices of backend name. It fails for an unknown name and for a
// backend without countable devices (Driver.Devices nil).
func DeviceCount(name string) (int, error) {
	d, err := Lookup(name)
	if err != nil {
		return 0, err
	}
	if d.Devices == nil {
		return 0, fmt.Errorf("backend: %s has no devices to count: it runs on the host's cores", name)
	}
	return d.Devices()
}

// HasDevices reports whether backend name runs on devices of its own, one per worker (Driver.Devices
// is set), rather than on the host's cores. It is false for an unknown name.
func HasDevices(name string) bool {
	d, err := Lookup(name)
	return err == nil && d.Devices != nil
}

// BindFlags binds the own settings of every registered backend that has some (Driver.NewConfig) to
// flags in fs and returns them by backend name, to be passed as Options.Config.
func BindFlags(fs *flag.FlagSet) map[string]FlagConfig {
	out := map[string]FlagConfig{}
	for _, n := range Names() {
		d, _ := Lookup(n)
		if d.NewConfig == nil {
			continue
		}
		c := d.NewConfig()
		c.AddFlags(fs)
		out[n] = c
	}
	return out
}
