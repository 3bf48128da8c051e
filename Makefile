# Container images and manifests. Image names and tags come from bincount.config (TRAINER_IMAGE, SERVING_IMAGE),
# the one place the manifests, the launchers and the pipeline components read them from.
PYTHON ?= .venv/bin/python
DOCKER ?= docker
config = $(shell $(PYTHON) -c 'from bincount.config import $(1); print($(1))')
TRAINER_IMAGE := $(call config,TRAINER_IMAGE)
SERVING_IMAGE := $(call config,SERVING_IMAGE)
ifeq ($(TRAINER_IMAGE),)
$(error cannot read the image names from bincount.config: set PYTHON to an interpreter with bincount installed)
endif

.PHONY: images trainer-image serving-image push kind-load manifests

images: trainer-image serving-image

trainer-image:
	$(DOCKER) build -f images/trainer/Dockerfile -t $(TRAINER_IMAGE) .

serving-image:
	$(DOCKER) build -f images/serving/Dockerfile -t $(SERVING_IMAGE) .

push: images
	$(DOCKER) push $(TRAINER_IMAGE)
	$(DOCKER) push $(SERVING_IMAGE)

# For a kind cluster (overlays/dev-cpu): no registry needed.
kind-load: images
	kind load docker-image $(TRAINER_IMAGE) $(SERVING_IMAGE)

manifests:
	$(PYTHON) -m bincount.cli manifests render --out manifests
