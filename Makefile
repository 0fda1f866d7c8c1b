# Zenith's entry points. CMake does the building; this file only names the
# everyday commands:
#   make demo    install what is missing, build, run the main job
#   make test    install what is missing, build, run every test, then the
#                unit tests again under ASan and UBSan
#   make deps | build | asan | bench | clean
BUILD      ?= build
BUILD_TYPE ?= Release
JOBS       ?= $(shell nproc)

.PHONY: all deps build test demo asan bench clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure --timeout 900
	@$(MAKE) --no-print-directory asan

demo: build
	@scripts/demo.sh $(BUILD)/bin

# Unit tests again under AddressSanitizer and UndefinedBehaviorSanitizer.
asan: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug >/dev/null
	@cmake --build build-asan -j$(JOBS)
	@cd build-asan && ctest --output-on-failure -L unit

bench: build
	@BUILD=$(BUILD) bench/bench_train.sh

clean:
	rm -rf $(BUILD) build-asan
