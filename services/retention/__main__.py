from services.kernel.server import main
from services.retention.server import SPEC

main(SPEC)
