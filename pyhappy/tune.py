"""``python -m pyhappy.tune``: show the measured-dispatch cache in use, or clear it (``--clear``).

The tuner itself is pyhappy/_tune.py; in Python, ``pyhappy.tune(model, *example_inputs)`` measures
every pyhappy layer of a model ahead of use.
"""

from pyhappy._tune import main

if __name__ == "__main__":
    main()
