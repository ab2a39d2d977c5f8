package cluster

import (
	"bytes"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// atLeast returns lg restricted to entries at lvl and above. A logger already that strict (or a nop
// logger) is returned as is, because zap.IncreaseLevel refuses to lower a level.
func atLeast(lg *zap.Logger, lvl zapcore.Level) *zap.Logger {
	if lg.Core().Enabled(lvl - 1) {
		return lg.WithOptions(zap.IncreaseLevel(lvl))
	}
	return lg
}

// quietCore drops every entry below DPanic once quiet is set. StartEmbedded uses it to silence the
// error lines etcd logs while it closes its listeners.
type quietCore struct {
	zapcore.Core
	quiet *atomic.Bool
}

func (q quietCore) With(fields []zapcore.Field) zapcore.Core {
	return quietCore{Core: q.Core.With(fields), quiet: q.quiet}
}

func (q quietCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if q.quiet.Load() && e.Level < zapcore.DPanicLevel {
		return ce
	}
	return q.Core.Check(e, ce)
}

// stdLogWriter turns the lines of a standard library *log.Logger (as memberlist writes them, with a
// "[LEVEL] " prefix) into zap entries at the matching level.
type stdLogWriter struct{ lg *zap.Logger }

func (w stdLogWriter) Write(p []byte) (int, error) {
	msg := bytes.TrimRight(p, "\r\n")
	lvl := zapcore.InfoLevel
	for _, l := range []struct {
		prefix string
		level  zapcore.Level
	}{
		{"[DEBUG] ", zapcore.DebugLevel},
		{"[TRACE] ", zapcore.DebugLevel},
		{"[INFO] ", zapcore.InfoLevel},
		{"[WARN] ", zapcore.WarnLevel},
		{"[ERR] ", zapcore.ErrorLevel},
		{"[ERROR] ", zapcore.ErrorLevel},
	} {
		if rest, ok := bytes.CutPrefix(msg, []byte(l.prefix)); ok {
			msg, lvl = rest, l.level
			break
		}
	}
	msg = bytes.TrimPrefix(msg, []byte("memberlist: "))
	if lvl == zapcore.ErrorLevel && bytes.HasPrefix(msg, []byte("Failed fallback TCP ping")) {
		// A probe of a slow or gone peer timed out: what failure detection is there to notice (the peer is
		// then suspected, and marked dead if it stays silent), not a fault of this process. A busy host
		// makes a few of these.
		lvl = zapcore.WarnLevel
	}
	if ce := w.lg.Check(lvl, string(msg)); ce != nil {
		ce.Write()
	}
	return len(p), nil
}
