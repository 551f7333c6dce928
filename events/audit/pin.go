package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/loomctl/loom/events/secretfile"
)

// pinVersion is the version of the pin file's format.
const pinVersion = 1

// Pin is what an auditor keeps between verifications: the keys they
// trust, the first seal of the history, and the last seal they verified.
// A history that verifies against it starts with the same seal and holds
// the same last seal, so nothing up to that seal was changed, removed,
// reordered, cut off or replaced by an older copy since.
type Pin struct {
	Version int `json:"version"`
	// Keys are the ids (KeyID) of the keys whose seals are trusted.
	Keys  []string `json:"keys"`
	First SealRef  `json:"first_seal"`
	Last  SealRef  `json:"last_seal"`
}

// LoadPin reads a pin file. A missing file is fs.ErrNotExist.
func LoadPin(path string) (*Pin, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var p Pin
	if err := json.Unmarshal(data, &p); err != nil {
		return nil, fmt.Errorf("pin %s: %w", path, err)
	}
	switch {
	case p.Version != pinVersion:
		return nil, fmt.Errorf("pin %s: version %d, this build reads %d", path, p.Version, pinVersion)
	case len(p.Keys) == 0:
		return nil, fmt.Errorf("pin %s: trusts no key", path)
	case p.First.Seq == 0 || p.Last.Seq < p.First.Seq || len(p.First.Hash) != len(Hash{}) || len(p.Last.Hash) != len(Hash{}):
		return nil, fmt.Errorf("pin %s: its seals are incomplete", path)
	}
	return &p, nil
}

// Advanced is the pin after a report that verified: the same keys (or
// the given ones for a first pin), the same first seal, and the report's
// last seal. It is nil when the report has no seal to pin.
func Advanced(p *Pin, r *Report, keys []string) *Pin {
	if r.Seals == 0 {
		return nil
	}
	next := &Pin{Version: pinVersion, Keys: slices.Sorted(slices.Values(keys)), First: r.FirstSeal, Last: r.LastSeal}
	if p != nil {
		next.Keys, next.First = p.Keys, p.First
	}
	return next
}

// Save writes the pin to path atomically: a crash leaves the old pin or
// the new one, never half of one.
func (p *Pin) Save(path string) error {
	data, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	if err := secretfile.WriteNew(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer func() { _ = dir.Close() }()
	return dir.Sync()
}

// PinExists tells whether path holds a pin file.
func PinExists(path string) (bool, error) {
	_, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
