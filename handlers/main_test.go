package handlers

import (
	"testing"

	"github.com/loomctl/loom/internal/leakcheck"
)

// TestMain fails the package when a goroutine of its code outlives the tests.
func TestMain(m *testing.M) { leakcheck.Main(m, "github.com/loomctl/loom/handlers.") }
