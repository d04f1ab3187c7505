"""The package's version, in a module of its own: modules that report it (telemetry) need not
import the package, which imports them."""

__version__ = "0.1.0"
