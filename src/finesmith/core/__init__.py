"""The bottom layer: what several stages share (console, device, templates and stop tokens,
cache paths).

Nothing here imports from the rest of finesmith except `finesmith.errors`, so every
package may import it without cycles.
"""
