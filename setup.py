"""Install elm-jax: Expert Language Models in JAX, Flax and seqio."""

import setuptools

# The dependency set below was installed together and tested on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    # clu.metric_writers imports tensorboard, which tensorflow no longer pulls in.
    "tensorboard==2.21.0",
    "clu==0.0.12",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "ml-dtypes==0.7.0",
    "safetensors==0.8.0",
    "tokenizers==0.22.2",  # transformers 4.57 (parity tests) needs < 0.23
    "PyYAML==6.0.4",
    "Jinja2==3.1.6",
    "matplotlib==3.11.2",
    "rouge-score==0.1.2",
    "sacrebleu==2.6.0",
    "tqdm==4.70.1",
]

EXTRAS_REQUIRE = {
    # torch, transformers, sentence-transformers and faiss serve parity tests and
    # side-by-side benchmarks only; the product never imports them at run time.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "transformers==4.57.6",
        "sentence-transformers==5.7.0",
        "faiss-cpu==1.15.1",
    ],
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="elm-jax",
    version="0.1.0",
    description="Expert Language Models (Jang et al., ICML 2023) in JAX, Flax and seqio.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["elm_jax", "elm_jax.*"]) + ["elm_jax.tasks"],
    # The seqio registrations live in the top-level tasks/ folder, as the layout of
    # T5X-style projects has it, and install as the elm_jax.tasks package.
    package_dir={"elm_jax.tasks": "tasks"},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["elm-jax = elm_jax.cli:main"]},
)
