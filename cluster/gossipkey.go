package cluster

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/zap"
)

// DefaultGossipKeyReload is how often a gossip node looks at its key file when
// GossipConfig.KeyReloadInterval is zero.
const DefaultGossipKeyReload = 5 * time.Second

// ReadGossipKeys reads a gossip key file: one base64 key of 16, 24 or 32 bytes (AES-128, -192 or
// -256) a line, the first the one that encrypts, all of them accepted to decrypt; blank lines and
// lines starting with # are skipped. The error names the file and the line, never a key.
func ReadGossipKeys(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster: gossip key file: %w", err)
	}
	return parseGossipKeys(path, data)
}

func parseGossipKeys(path string, data []byte) ([][]byte, error) {
	var keys [][]byte
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("%w: gossip key file %s, line %d: not base64", ErrInvalid, path, i+1)
		}
		if n := len(k); n != 16 && n != 24 && n != 32 {
			return nil, fmt.Errorf("%w: gossip key file %s, line %d: a key of %d bytes, want 16, 24 or 32", ErrInvalid, path, i+1, n)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: gossip key file %s holds no key", ErrInvalid, path)
	}
	return keys, nil
}

// keyFile follows a gossip key file and installs its keys in a memberlist keyring.
type keyFile struct {
	path  string
	ring  *memberlist.Keyring
	stamp string // size and modification time when last read
	lg    *zap.Logger
}

// newKeyFile reads path and makes the keyring of its keys.
func newKeyFile(path string, lg *zap.Logger) (*keyFile, error) {
	kf := &keyFile{path: path, lg: lg}
	keys, stamp, err := kf.read()
	if err != nil {
		return nil, err
	}
	if kf.ring, err = memberlist.NewKeyring(keys, keys[0]); err != nil {
		return nil, fmt.Errorf("%w: gossip key file %s: %v", ErrInvalid, path, err)
	}
	kf.stamp = stamp
	return kf, nil
}

func (kf *keyFile) read() ([][]byte, string, error) {
	st, err := os.Stat(kf.path)
	if err != nil {
		return nil, "", fmt.Errorf("cluster: gossip key file: %w", err)
	}
	keys, err := ReadGossipKeys(kf.path)
	return keys, fmt.Sprintf("%d/%d", st.Size(), st.ModTime().UnixNano()), err
}

// reload installs the file's keys when it changed: the new ones are added, the first becomes the
// primary, and keys no longer in the file are removed. It reports whether the file changed.
func (kf *keyFile) reload() (bool, error) {
	st, err := os.Stat(kf.path)
	if err != nil {
		return false, fmt.Errorf("cluster: gossip key file: %w", err)
	}
	if fmt.Sprintf("%d/%d", st.Size(), st.ModTime().UnixNano()) == kf.stamp {
		return false, nil
	}
	keys, stamp, err := kf.read()
	if err != nil {
		return false, err
	}
	for _, k := range keys {
		if err := kf.ring.AddKey(k); err != nil {
			return false, fmt.Errorf("cluster: gossip key file %s: %w", kf.path, err)
		}
	}
	if err := kf.ring.UseKey(keys[0]); err != nil {
		return false, fmt.Errorf("cluster: gossip key file %s: %w", kf.path, err)
	}
	for _, k := range kf.ring.GetKeys() {
		if !slices.ContainsFunc(keys, func(n []byte) bool { return bytes.Equal(n, k) }) {
			if err := kf.ring.RemoveKey(k); err != nil {
				return false, fmt.Errorf("cluster: gossip key file %s: %w", kf.path, err)
			}
		}
	}
	kf.stamp = stamp
	return true, nil
}

// watch reloads the file every interval until stop is closed.
func (kf *keyFile) watch(stop <-chan struct{}, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		switch ok, err := kf.reload(); {
		case err != nil:
			kf.lg.Warn("gossip key reload failed; keeping the previous keys", zap.Error(err))
		case ok:
			kf.lg.Info("gossip keys reloaded", zap.String("gossip-key-file", kf.path), zap.Int("gossip-keys", len(kf.ring.GetKeys())))
		}
	}
}
