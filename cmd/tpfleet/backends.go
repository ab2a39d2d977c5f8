package main

// The backends this binary offers (--device NAME). They register themselves in their package's init;
// nothing else of theirs is used here: commands open them with backend.Open and use their optional
// capabilities (package backend's interfaces).
import (
	_ "github.com/tpfleet/tpfleet/backend/cpu"
	_ "github.com/tpfleet/tpfleet/backend/cuda"
)
