"""`python -m lavie_jax.demo` (what `make demo` runs); see lavie_jax.demo.main."""

import sys

from lavie_jax.demo.main import main

sys.exit(main())
