from services.exposure.server import SPEC
from services.kernel.server import main

main(SPEC)
