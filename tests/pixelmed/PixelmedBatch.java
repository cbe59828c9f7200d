// Pixelmed's validators for a whole test session in one JVM (tests/conftest.py starts it once): the SR
// validator compiles its XSLT templates once (about 5-10 s of CPU), not once per file as its command line does,
// and the JIT stays warm. File paths come on stdin, one per line; a line "--end--" closes a batch and is
// answered "==< done". Each file's report follows a line "==> FILE" (SR: DicomSRValidator; other objects:
// DicomInstanceValidator); a file Pixelmed cannot read gets an "Error" line of its own.
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.SOPClass;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

public class PixelmedBatch {
    private static DicomSRValidator sr = null;
    private static DicomInstanceValidator iod = null;

    private static void validate(String file) throws Exception {
        System.out.println("==> " + file);
        AttributeList list = new AttributeList();
        list.read(file);
        String sopClass = com.pixelmed.dicom.Attribute.getSingleStringValueOrEmptyString(list, TagFromName.SOPClassUID);
        if (SOPClass.isStructuredReport(sopClass)) {
            if (sr == null) sr = new DicomSRValidator();
            System.out.println(sr.validate(list));
        } else {
            if (iod == null) iod = new DicomInstanceValidator();
            System.out.println(iod.validate(list));
        }
    }

    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.equals("--end--")) {
                System.out.println("==< done");
                System.out.flush();
                continue;
            }
            try {
                validate(line);
            } catch (Exception e) {  // an error of that file, not the end of the session
                System.out.println("Error: Pixelmed could not read or validate the file: " + e);
            }
        }
    }
}
