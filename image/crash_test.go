package image_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"strata/image"
	it "strata/image/imagetest"
	"strata/internal/testenv"
)

// bigLayers are layers with enough data that an unpack takes a while.
func bigLayers(t testing.TB, tag string, n int) []it.Layer {
	var out []it.Layer
	for i := range n {
		var ents []it.Entry
		for j := range 40 {
			ents = append(ents, it.Entry{Name: fmt.Sprintf("%s/l%d/f%d", tag, i, j), Data: strings.Repeat(fmt.Sprintf("%s%d-%d ", tag, i, j), 4000)})
		}
		out = append(out, it.Layer{Tar: it.Tar(t, ents...), Compression: it.Compression(i % 3)})
	}
	return out
}

// TestConcurrentUnpack: two unpacks of images sharing layers, at the same
// time, each through its own Store value: every layer is unpacked once.
func TestConcurrentUnpack(t *testing.T) {
	shared := bigLayers(t, "shared", 3)
	a := append(append([]it.Layer{}, shared...), bigLayers(t, "a", 1)...)
	b := append(append([]it.Layer{}, shared...), bigLayers(t, "b", 1)...)
	src := t.TempDir()
	it.WriteOCI(t, src, it.Image{Name: "a", Layers: a}, it.Image{Name: "b", Layers: b})
	for round := range 4 {
		dir := filepath.Join(t.TempDir(), "store")
		var wg sync.WaitGroup
		res := make([]*image.UnpackResult, 2)
		errs := make([]error, 2)
		for i, ref := range []string{"a", "b"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, err := image.Open(dir, image.Options{})
				if err == nil {
					var source *image.Source
					source, err = image.OpenSource(src)
					if err == nil {
						res[i], err = s.Unpack(ctx, source, image.UnpackOptions{Ref: ref})
						source.Close()
					}
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		if errs[0] != nil || errs[1] != nil {
			t.Fatalf("round %d: %v, %v", round, errs[0], errs[1])
		}
		news := map[string]int{}
		for _, r := range res {
			for _, c := range r.New {
				news[c]++
			}
		}
		if len(news) != 5 {
			t.Errorf("round %d: %d layers unpacked, want 5: %v", round, len(news), news)
		}
		for c, n := range news {
			if n != 1 {
				t.Errorf("round %d: layer %s unpacked %d times", round, c, n)
			}
		}
		ents, _ := os.ReadDir(filepath.Join(dir, "layers"))
		if len(ents) != 5 {
			t.Errorf("round %d: %d layer dirs", round, len(ents))
		}
	}
}

// TestHelperProcess is the unpacking child of the crash tests. With
// STRATA_HANG=event:n it stops (forever) at the n-th such event of the
// unpack, after printing "HANG".
func TestHelperProcess(t *testing.T) {
	store := os.Getenv("STRATA_STORE")
	if store == "" {
		t.Skip("helper of TestKill9*")
	}
	if hang := os.Getenv("STRATA_HANG"); hang != "" {
		event, n, _ := strings.Cut(hang, ":")
		count := 0
		image.SetTestHook(func(e, chain string) {
			if e != event {
				return
			}
			if count++; fmt.Sprint(count) == n {
				fmt.Println("HANG", chain)
				os.Stdout.Sync()
				select {}
			}
		})
	}
	s, err := image.Open(store, image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src, err := image.OpenSource(os.Getenv("STRATA_SRC"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("START")
	if _, err := s.Unpack(context.Background(), src, image.UnpackOptions{}); err != nil {
		t.Fatal(err)
	}
}

func helper(t *testing.T, store, src, hang string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), "STRATA_STORE="+store, "STRATA_SRC="+src, "STRATA_HANG="+hang)
	return cmd
}

// killAt runs the helper until it prints HANG, then kills it with
// SIGKILL.
func killAt(t *testing.T, store, src, hang string) {
	t.Helper()
	cmd := helper(t, store, src, hang)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	hung := false
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "HANG") {
			hung = true
			break
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if !hung {
		t.Fatalf("helper did not reach %s", hang)
	}
}

// checkComplete checks the store invariant: every layers/<hex> is a
// complete layer, equal to the same layer unpacked by an undisturbed run;
// every image record's layers exist.
func checkComplete(t *testing.T, dir, cleanDir string) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(dir, "layers"))
	for _, e := range ents {
		for _, f := range []string{"diffid", "size"} {
			if _, err := os.Stat(filepath.Join(dir, "layers", e.Name(), f)); err != nil {
				t.Errorf("half layer %s: %v", e.Name(), err)
			}
		}
		got := it.Tree(t, filepath.Join(dir, "layers", e.Name(), "diff"))
		want := it.Tree(t, filepath.Join(cleanDir, "layers", e.Name(), "diff"))
		if got != want {
			t.Errorf("layer %s differs from an undisturbed unpack", e.Name())
		}
	}
	s, err := image.Open(dir, image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	imgs, _ := s.Images()
	for _, img := range imgs {
		for _, d := range s.LowerDirs(img) {
			if _, err := os.Stat(d); err != nil {
				t.Errorf("image %s without its layer: %v", img.Name, err)
			}
		}
	}
}

// TestKill9: an unpack killed at any point leaves no half layer under a
// chainID, only temporary dirs, which the next unpack removes; that
// unpack completes the image.
func TestKill9(t *testing.T) {
	testenv.RequireMknod(t)
	ls := bigLayers(t, "k", 4)
	src := t.TempDir()
	it.WriteOCI(t, src, it.Image{Name: "k", Layers: ls})
	clean, cleanDir := openStore(t)
	if _, err := unpack(t, clean, src, image.UnpackOptions{}); err != nil {
		t.Fatal(err)
	}
	finish := func(t *testing.T, dir string) {
		t.Helper()
		s, err := image.Open(dir, image.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unpack(t, s, src, image.UnpackOptions{}); err != nil {
			t.Fatalf("unpack after the crash: %v", err)
		}
		checkComplete(t, dir, cleanDir)
		if ents, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(ents) != 0 {
			t.Errorf("leftovers not removed: %v", ents)
		}
		if imgs, _ := s.Images(); len(imgs) != 1 {
			t.Errorf("images: %v", imgs)
		}
	}
	t.Run("before-commit", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "store")
		killAt(t, dir, src, "imported:2")
		if ents, _ := os.ReadDir(filepath.Join(dir, "layers")); len(ents) != 0 {
			t.Errorf("layers visible before the commit: %v", ents)
		}
		if ents, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(ents) == 0 {
			t.Errorf("no leftovers in tmp: the kill came too late?")
		}
		finish(t, dir)
	})
	t.Run("during-commit", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "store")
		killAt(t, dir, src, "committed:1")
		if ents, _ := os.ReadDir(filepath.Join(dir, "layers")); len(ents) != 1 {
			t.Errorf("layers after one commit: %v", ents)
		}
		checkComplete(t, dir, cleanDir)
		if ents, _ := os.ReadDir(filepath.Join(dir, "images")); len(ents) != 0 {
			t.Errorf("image recorded before all its layers: %v", ents)
		}
		finish(t, dir)
	})
	t.Run("random", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "store")
		for i := range 12 {
			cmd := helper(t, dir, src, "")
			out, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			bufio.NewReader(out).ReadString('\n') // START
			time.Sleep(time.Duration(rand.Intn(60)) * time.Millisecond)
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			checkComplete(t, dir, cleanDir)
			if t.Failed() {
				t.Fatalf("after kill %d", i)
			}
			if i%4 == 3 {
				// Sometimes remove what got done, to kill early steps again.
				s, _ := image.Open(dir, image.Options{})
				s.Remove(ctx, "k", image.RemoveOptions{})
				s.Prune(ctx, image.RemoveOptions{})
			}
		}
		finish(t, dir)
	})
}
